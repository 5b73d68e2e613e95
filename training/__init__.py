"""Training on a release: SFT, DPO and ORPO with TRL (importable without torch)."""
