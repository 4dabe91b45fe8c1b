# Copied verbatim from the seed guide (shared/seed/000_9df41d62738ae02c.txt), Testing, 'Run Unit Tests'; run by tests/test_seed_guide.py.
# Run all tests
python -m pytest test_llm_training.py -v

# Run specific test category
python -m pytest test_llm_training.py::TestDistributedTraining -v

# Run with coverage
python -m pytest test_llm_training.py --cov=exercise --cov-report=html
