"""The team tracking server (cluster/mlflow/server-team.sh) on a real PostgreSQL and a real
S3-compatible store: runs land in PostgreSQL, artifacts in the bucket, both only through the
server over HTTP (what trials on any node and people's browsers use)."""

import os

import boto3
import psycopg
import pytest
from mlflow import MlflowClient

from servers import TEAM_SERVER, MlflowServer, postgres_bin, postgres_server, s3_server

pytestmark = pytest.mark.slow

if postgres_bin("initdb") is None:
    if os.environ.get("CI"):
        raise RuntimeError("PostgreSQL is missing: .ci/run installs Debian's postgresql package")
    pytest.skip("PostgreSQL is not installed: apt-get install postgresql", allow_module_level=True)


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("team")
    with postgres_server(folder / "pg") as database, s3_server(folder) as endpoint:
        credentials = {"AWS_ACCESS_KEY_ID": "probesweep", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name=credentials["AWS_DEFAULT_REGION"],
            aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"], aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip
        s3.create_bucket(Bucket="probesweep-mlflow")
        env = {
            "MLFLOW_BACKEND_STORE_URI": database,
            "MLFLOW_ARTIFACTS_DESTINATION": "s3://probesweep-mlflow/artifacts",
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "MLFLOW_WORKERS": "1",
            **credentials,
        }
        server = MlflowServer(folder / "mlflow", script=TEAM_SERVER, env=env)
        try:
            yield server.start(timeout=180), database, s3
        finally:
            server.stop()


def test_runs_go_to_postgresql_and_artifacts_to_the_bucket(team_server, tmp_path):
    url, database, s3 = team_server
    client = MlflowClient(url)  # HTTP only: no database or bucket credentials on this side
    experiment = client.create_experiment("team")
    run = client.create_run(experiment, tags={"trial_id": "t1"})
    run_id = run.info.run_id
    client.log_param(run_id, "loss", "bce")
    for step, value in enumerate([0.5, 0.7, 0.8], start=1):
        client.log_metric(run_id, "val/accuracy", value, step=step)
    (tmp_path / "probe.pt").write_bytes(b"probe weights")
    client.log_artifact(run_id, str(tmp_path / "probe.pt"))
    client.set_terminated(run_id)

    # read back through the server
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.data.metrics["val/accuracy"] == 0.8
    assert finished.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    downloaded = client.download_artifacts(run_id, "probe.pt", str(tmp_path / "back"))
    assert open(downloaded, "rb").read() == b"probe weights"

    # and where it is stored: the run in PostgreSQL, the artifact in the bucket
    with psycopg.connect(database) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cursor.fetchone() == ("FINISHED",)
        cursor.execute("SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'val/accuracy' ORDER BY step", (run_id,))
        assert cursor.fetchall() == [(1, 0.5), (2, 0.7), (3, 0.8)]
    key = f"artifacts/{experiment}/{run_id}/artifacts/probe.pt"
    assert s3.get_object(Bucket="probesweep-mlflow", Key=key)["Body"].read() == b"probe weights"
