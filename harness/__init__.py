"""Test and benchmark harness: start this project's servers (the service, MLflow's servers, nginx) as
child processes on free loopback ports, the way an operator would, and stop them. Not shipped with the
service or the pipeline."""
