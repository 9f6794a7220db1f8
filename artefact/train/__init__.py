"""Training one model: the loop, tiled evaluation, reporters, checkpoints, hardware and
fault injection. Plain PyTorch, no Ray: ``artefact.tune`` drives it under Ray."""
