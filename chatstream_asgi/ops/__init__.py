"""Operations: admission and rejections, metrics, health and drain, lifespan, signals, resource usage."""
