"""clipmill.stages"""
