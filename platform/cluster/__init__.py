"""Ray clusters: connecting and checking resources (Python), launching jobs and images (the scripts here)."""
