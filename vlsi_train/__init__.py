"""vlsi_train: VLsI distillation stages (verbalize, interact, SFT)."""
