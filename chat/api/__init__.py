"""The JSON API blueprints and the helpers they share."""
