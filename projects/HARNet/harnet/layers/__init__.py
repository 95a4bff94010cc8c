"""Post-processing ops: soft-NMS, box voting (pure tensor functions, CPU and GPU)."""
