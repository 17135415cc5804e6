"""Stage one: images -> features (manifests, country labels, images, backbone, fine-tuning, extraction)."""
