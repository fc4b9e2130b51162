"""`dcaccel serve`: dcaccel pipelines served over HTTP on Ray Serve (pip install 'dcaccel[serve]').

    request.py  what a client may send, checked strictly
    model.py    one replica's pipeline (no Ray): loading, DeepCache, a batch of requests -> one pipeline call
    app.py      the Ray Serve deployments (ingress, generator replicas) and build_app(args)
    server.py   start or join Ray, run the app, drain on Ctrl-C; the Serve config file for clusters
"""
