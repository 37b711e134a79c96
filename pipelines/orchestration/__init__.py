"""The stages as one cached pipeline: its config tree (config), the steps (workflow, `vit run`), one run per
workdir (lease), Ray Jobs (jobs and package: `vit submit`, `vit jobs`) and schedules (schedule: `vit schedule`,
on Prefect)."""
