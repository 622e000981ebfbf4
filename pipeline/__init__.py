"""clipmill.pipeline"""
