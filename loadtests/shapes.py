"""Step load shape for the `ramp` profile: RAMP_STEP_USERS more users every RAMP_STEP_SECONDS."""

import os

from locust import LoadTestShape


class StepLoad(LoadTestShape):
    step_users = int(os.environ.get("RAMP_STEP_USERS", "16"))
    step_seconds = int(os.environ.get("RAMP_STEP_SECONDS", "15"))
    max_users = int(os.environ.get("RAMP_MAX_USERS", "256"))

    def tick(self):
        step = int(self.get_run_time() // self.step_seconds) + 1
        users = step * self.step_users
        if users > self.max_users:
            return None
        return users, self.step_users
