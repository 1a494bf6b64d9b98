import os
def test_after(ray_session):
    import ray
    assert ray.is_initialized()
    assert "RAY_TMPDIR" not in os.environ
    assert ray.data.range(100).map_batches(lambda b: b).count() == 100
    assert ray.get(ray.remote(lambda: 1).remote()) == 1
    import ray.experimental.internal_kv as kv
    assert kv._internal_kv_initialized()
    print("after", ray.cluster_resources())
