"""clipmill.storage"""
