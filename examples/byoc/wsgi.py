"""What gunicorn serves: the Flask app, wrapped so the agent counts every `/invocations`."""

from agent import hooks
from examples.byoc import predictor

app = hooks.WSGIMiddleware(predictor.app)
