"""qomni on Ray Serve: engine replicas behind one OpenAI endpoint (`qomni serve --replicas N`).

Needs the `ray` extra (`pip install 'qomni[ray]'`). See docs/scaling.md."""

from qomni.serve_ray.app import ENGINE, INGRESS, app_builder, build_app

__all__ = ["ENGINE", "INGRESS", "app_builder", "build_app"]
