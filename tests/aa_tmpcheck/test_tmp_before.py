def test_before(ray_session):
    import ray
    assert ray.data.range(10).count() == 10
    print("before", ray.get_runtime_context().get_node_id())
