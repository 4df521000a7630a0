def test_fixtures_build(tiny_checkpoint):
    registry, resolved = tiny_checkpoint
    assert registry.resolve("tiny").version == resolved.version == 1
