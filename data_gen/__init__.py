"""Token-aligned synthetic images: geometry on the visual grid, settings, rendering, experiment pairs."""
