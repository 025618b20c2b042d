"""The HTTP edge: the app factory, routes, middleware, handlers, body reading and the server."""
