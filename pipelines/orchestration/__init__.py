"""The stages as one cached pipeline (`vit run`), and Ray Jobs (`vit submit`, `vit jobs`)."""
