"""nginx → gunicorn → Flask, the layout of SageMaker's bring-your-own-container example."""
