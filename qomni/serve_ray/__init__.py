"""qomni on Ray Serve: engine replicas behind one OpenAI endpoint (`qomni serve --replicas N`),
their speech made by talker replicas of its own with `--talker-replicas M`.

Needs the `ray` extra (`pip install 'qomni[ray]'`). See docs/scaling.md."""

from qomni.serve_ray.app import ENGINE, INGRESS, TALKER, app_builder, build_app

__all__ = ["ENGINE", "INGRESS", "TALKER", "app_builder", "build_app"]
