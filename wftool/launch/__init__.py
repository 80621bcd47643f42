"""`wft launch`: the same recipe on a cloud. A recipe plus the command-line flags resolve to a
`LaunchPlan` (plan.py); rules the clouds do not enforce themselves are checked on it
(rules.py); each backend turns it into what it submits (skypilot_task.py, modal_backend.py).
Nothing here imports SkyPilot or Modal until a job is really sent."""
