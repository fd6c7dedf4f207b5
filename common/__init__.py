"""Small pieces every layer shares, importing nothing else of the project: errors and the command-line entry
(errors, cli), results on disk (results) and geometry on the visual token grid (geometry)."""
