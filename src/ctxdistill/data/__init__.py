from ctxdistill.data.tasks import Example, Task, build_task

__all__ = ["Example", "Task", "build_task"]
