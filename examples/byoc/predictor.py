"""The Flask app of the example: `/ping` and `/invocations`, as SageMaker calls them.

As in SageMaker's scikit_bring_your_own `predictor.py`, with the linear model of
examples/model.py and one addition: the model's part of a request is timed with
`@hooks.inference` (ModelLatency); `wsgi.py` wraps the app in `hooks.WSGIMiddleware`, which
counts every `/invocations` request with its status.
"""

from __future__ import annotations

import flask

from agent import hooks
from examples.model import LinearModel

app = flask.Flask(__name__)
MODEL = LinearModel()


@hooks.inference
def predict(rows: list[list[float]]) -> list[float]:
    """The model's part of a request: timed as ModelLatency."""
    return MODEL.predict(rows)


@app.route("/ping", methods=["GET"])
def ping() -> flask.Response:
    """Healthy when the model is loaded (it is, once this module is imported)."""
    return flask.Response(response="\n", status=200, mimetype="application/json")


@app.route("/invocations", methods=["POST"])
def invocations() -> flask.Response:
    """Rows of 3 features in (`[[1, 2, 3], ...]`), predictions out."""
    rows = flask.request.get_json(force=True, silent=True)
    try:
        predictions = predict(rows)
    except (TypeError, ValueError):
        return flask.Response(response='{"error": "expected rows of 3 numbers"}\n', status=400,
                              mimetype="application/json")
    return flask.jsonify(predictions=predictions)
