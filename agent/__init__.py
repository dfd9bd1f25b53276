"""Agent role: the edge daemon that enrolls, trains locally, protects and uploads its update."""
