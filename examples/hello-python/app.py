"""hello-python: the smallest InvokeX function for a python3.x runtime.

Handler: app.handler. Event {"name": "x"} -> {"message": "Hello, x!"}.
"""


def handler(event, context):
    name = (event or {}).get("name") or "world"
    # print() output lands in the invocation's log.
    print("request %s: greeting %s" % (context.aws_request_id, name))
    return {"message": "Hello, %s!" % name}
