"""Input layouts beyond plain videos: frame-folder archives and WebDataset sample tars."""
