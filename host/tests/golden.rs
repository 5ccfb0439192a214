//! The EfficientNet-Lite0 backbone against reference outputs of an independent implementation
//! (`../shared/golden/efficientnet_lite0.*`): features within 1e-3, and the ImageNet top-5.

use candle_core::Device;
use petcam_host::backbone::Backbone;
use petcam_host::test_support::{max_abs_diff, shared_fixture};

#[test]
fn efficientnet_lite0_reproduces_golden_features_and_top5() {
    let (Some(weights), Some(golden), Some(json)) = (
        shared_fixture("backbones/efficientnet-lite0-57934424.pth"),
        shared_fixture("golden/efficientnet_lite0.safetensors"),
        shared_fixture("golden/efficientnet_lite0.json"),
    ) else {
        return;
    };
    let dev = Device::Cpu;
    let net = Backbone::load("efficientnet-lite0", &weights, &dev).unwrap();
    let golden = candle_core::safetensors::load(&golden, &dev).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    for image in meta["images"].as_array().unwrap() {
        let i = image["index"].as_u64().unwrap();
        let rgb = &golden[&format!("rgb_{i}")];
        let input = &golden[&format!("input_{i}")];
        // Our normalisation of the reference bytes must give the reference input exactly.
        let ours_input = net.normalize(&rgb.unsqueeze(0).unwrap()).unwrap();
        assert!(max_abs_diff(&ours_input, input) < 1e-6, "input {i} differs");

        let features = net.features(&rgb.unsqueeze(0).unwrap()).unwrap();
        let diff = max_abs_diff(&features, &golden[&format!("features_{i}")]);
        eprintln!("image {i}: max abs feature error {diff:.2e}");
        assert!(diff <= 1e-3, "image {i}: max abs feature error {diff}");

        let logits = net.imagenet_logits(&features).unwrap().unwrap();
        let mut order: Vec<(usize, f32)> = logits
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .enumerate()
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        let ours: Vec<u64> = order[..5].iter().map(|(c, _)| *c as u64).collect();
        let theirs: Vec<u64> = image["top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["class"].as_u64().unwrap())
            .collect();
        assert_eq!(ours, theirs, "image {i}: top-5 differs");
        let logit_diff = max_abs_diff(&logits, &golden[&format!("logits_{i}")]);
        assert!(
            logit_diff <= 1e-2,
            "image {i}: max abs logit error {logit_diff}"
        );
    }
}
