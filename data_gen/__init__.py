"""Token-aligned synthetic images (SPEC sections 1, 2, 4): geometry on the visual token grid (scenes),
settings and prompts (settings), drawing and the render command (render), experiment pairs (pairs)."""
