"""exit-arbiter: the control plane of exit policy (thresholds from calibration curves)."""
