"""The model layer: loading Qwen2-VL and Gemma 3 (or their offline tiny twins), hooks, scoring, results."""
