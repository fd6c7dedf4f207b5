"""Token-aligned images and what the experiments ask of them (docs/experiments.md: "Task and prompts", "Images
and the visual grid", "What'sUp composites"): settings and prompts (settings), drawing and the render command
(render), experiment pairs and ablation sources (pairs), a setting's samples (samples), What'sUp composites
(whatsup). Uses only `common` of this project; geometry on the token grid is common.geometry."""
