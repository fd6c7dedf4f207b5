"""Linear probes on visual embeddings (paper section 5.1, B.3, B.4): extract.py caches the embeddings,
probes.py fits and stores the probes, heatmaps.py applies them to every token, run.py is the command."""

from probing.probes import Probe, load_probe

__all__ = ["Probe", "load_probe"]
