-- Run by the postgres image on its first start (an empty data volume): the hyperparameter tuner's
-- Optuna studies get their own database beside MLflow's. On an existing volume, create it once with
--   docker compose exec postgres createdb -U mlflow optuna
CREATE DATABASE optuna;
