"""Interventions that steer a loaded VLM: attention scaling on image tokens (ScalingVis, AdaptVis)."""
