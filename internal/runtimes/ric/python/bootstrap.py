"""InvokeX runtime interface client for Python (3.9+, standard library only).

The sandbox runs it as `python3.X /var/runtime/python/bootstrap.py`. It speaks
Lambda's Runtime API at $AWS_LAMBDA_RUNTIME_API: it imports the handler named
by $_HANDLER ("file.function") from $LAMBDA_TASK_ROOT during INIT, then loops
forever fetching an event, calling handler(event, context) and posting the
result or the error. It mirrors what AWS's own Python runtime does, so code
that runs on Lambda runs here unchanged.
"""

import base64
import decimal
import http.client
import importlib
import json
import logging
import os
import sys
import time
import traceback

API_PREFIX = "/2018-06-01/runtime"
ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"
THIS_FILE = os.path.abspath(__file__)


class RuntimeAPI:
    """A client of the Runtime API over one persistent HTTP/1.1 connection.

    The agent serves one runtime, so a single connection carries every
    request; it is re-opened once if the agent closed it between requests.
    """

    def __init__(self, address):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("AWS_LAMBDA_RUNTIME_API must be host:port, got %r" % address)
        self.host = host
        self.port = int(port)
        self.conn = None

    def _request(self, method, path, body=None, headers=None):
        for attempt in (1, 2):
            if self.conn is None:
                # No timeout: GET /next blocks until there is an event.
                self.conn = http.client.HTTPConnection(self.host, self.port)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                return resp, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise

    def next(self):
        resp, body = self._request("GET", API_PREFIX + "/invocation/next")
        if resp.status != 200:
            raise RuntimeError("GET /invocation/next: HTTP %d: %s" % (resp.status, body[:200]))
        return resp.headers, body

    def post_response(self, request_id, payload):
        return self._post(
            "%s/invocation/%s/response" % (API_PREFIX, request_id),
            payload,
            {"Content-Type": "application/json"},
        )

    def post_error(self, request_id, error_doc, error_type):
        return self._post(
            "%s/invocation/%s/error" % (API_PREFIX, request_id),
            json.dumps(error_doc).encode(),
            {"Content-Type": "application/json", ERROR_TYPE_HEADER: error_type},
        )

    def restore_next(self):
        """SnapStart: end INIT and wait until the environment is restored."""
        resp, body = self._request("GET", API_PREFIX + "/restore/next")
        if resp.status != 200:
            raise RuntimeError("GET /restore/next: HTTP %d: %s" % (resp.status, body[:200]))

    def post_restore_error(self, error_doc, error_type):
        return self._post(
            API_PREFIX + "/restore/error",
            json.dumps(error_doc).encode(),
            {"Content-Type": "application/json", ERROR_TYPE_HEADER: error_type},
        )

    def post_init_error(self, error_doc, error_type):
        return self._post(
            API_PREFIX + "/init/error",
            json.dumps(error_doc).encode(),
            {"Content-Type": "application/json", ERROR_TYPE_HEADER: error_type},
        )

    def _post(self, path, body, headers):
        resp, data = self._request("POST", path, body, headers)
        if resp.status >= 300:
            # The agent refused it (e.g. 413: response too large). It has
            # already failed the invocation; the runtime carries on.
            sys.stderr.write("invokex runtime: POST %s: HTTP %d: %s\n" % (path, resp.status, data[:200].decode("utf-8", "replace")))
            sys.stderr.flush()
        return resp.status


class FaultError(Exception):
    """An error of the runtime itself (bad handler, import failure), with Lambda's errorType."""

    def __init__(self, error_type, message, tb=None):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.tb = tb


# ---------------------------------------------------------------------------
# The context object, as AWS's runtime builds it.


class CognitoIdentity:
    __slots__ = ["cognito_identity_id", "cognito_identity_pool_id"]

    def __init__(self, doc):
        self.cognito_identity_id = doc.get("cognitoIdentityId")
        self.cognito_identity_pool_id = doc.get("cognitoIdentityPoolId")

    def __repr__(self):
        return "CognitoIdentity([cognito_identity_id=%s,cognito_identity_pool_id=%s])" % (
            self.cognito_identity_id,
            self.cognito_identity_pool_id,
        )


class Client:
    __slots__ = ["installation_id", "app_title", "app_version_name", "app_version_code", "app_package_name"]

    def __init__(self, doc):
        self.installation_id = doc.get("installation_id")
        self.app_title = doc.get("app_title")
        self.app_version_name = doc.get("app_version_name")
        self.app_version_code = doc.get("app_version_code")
        self.app_package_name = doc.get("app_package_name")


class ClientContext:
    __slots__ = ["custom", "env", "client"]

    def __init__(self, doc):
        client = doc.get("client")
        self.client = Client(client) if isinstance(client, dict) else None
        self.custom = doc.get("custom")
        self.env = doc.get("env")

    def __repr__(self):
        return "ClientContext([custom=%s,env=%s,client=%s])" % (self.custom, self.env, self.client)


class LambdaContext:
    def __init__(self, request_id, deadline_ms, invoked_function_arn, client_context, identity):
        env = os.environ
        self.aws_request_id = request_id
        self.invoked_function_arn = invoked_function_arn
        self.function_name = env.get("AWS_LAMBDA_FUNCTION_NAME")
        self.function_version = env.get("AWS_LAMBDA_FUNCTION_VERSION")
        # A string, as on Lambda.
        self.memory_limit_in_mb = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
        self.log_group_name = env.get("AWS_LAMBDA_LOG_GROUP_NAME")
        self.log_stream_name = env.get("AWS_LAMBDA_LOG_STREAM_NAME")
        self.client_context = ClientContext(client_context) if isinstance(client_context, dict) else None
        self.identity = CognitoIdentity(identity if isinstance(identity, dict) else {})
        self.tenant_id = None
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self):
        return max(self._deadline_ms - int(time.time() * 1000), 0)

    def log(self, msg):
        sys.stdout.write(str(msg))
        sys.stdout.flush()

    def __repr__(self):
        return (
            "LambdaContext([aws_request_id=%s,log_group_name=%s,log_stream_name=%s,"
            "function_name=%s,memory_limit_in_mb=%s,function_version=%s,"
            "invoked_function_arn=%s,client_context=%s,identity=%s])"
            % (
                self.aws_request_id,
                self.log_group_name,
                self.log_stream_name,
                self.function_name,
                self.memory_limit_in_mb,
                self.function_version,
                self.invoked_function_arn,
                self.client_context,
                self.identity,
            )
        )


def decode_json_header(value):
    """Decodes a JSON header (client context, Cognito identity).

    Lambda's Runtime API carries plain JSON; base64-encoded JSON (as Invoke's
    X-Amz-Client-Context is) is accepted too so either agent encoding works.
    """
    if not value:
        return None
    value = value.strip()
    if not value.startswith("{"):
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
    try:
        return json.loads(value)
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# Logging: the root logger writes Lambda's line format to stdout, tagged with
# the current request id, before user code is imported (so, as on Lambda,
# logging.basicConfig() in user code is a no-op).

current_request_id = ""


class RequestIdFilter(logging.Filter):
    def filter(self, record):
        record.aws_request_id = current_request_id
        return True


def setup_logging():
    handler = logging.StreamHandler(sys.stdout)
    formatter = logging.Formatter(
        "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s",
        "%Y-%m-%dT%H:%M:%S",
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    logging.getLogger().addHandler(handler)
    level = os.environ.get("AWS_LAMBDA_LOG_LEVEL", "").upper()
    if level in ("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "CRITICAL"):
        logging.getLogger().setLevel("WARNING" if level == "WARN" else level)


def flush_output():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


# ---------------------------------------------------------------------------
# Errors


def user_stack(tb):
    """Traceback lines of tb without this file's own frames."""
    frames = [
        f
        for f in traceback.extract_tb(tb)
        if os.path.abspath(f.filename) != THIS_FILE and not f.filename.startswith("<frozen")
    ]
    return traceback.format_list(frames)


def error_doc(error_type, message, stack, request_id=""):
    return {
        "errorMessage": message,
        "errorType": error_type,
        "requestId": request_id,
        "stackTrace": stack,
    }


def log_error(doc):
    """Writes an error to the log as Lambda's Python runtime does."""
    lines = ["[ERROR] %s: %s" % (doc["errorType"], doc["errorMessage"])]
    if doc["stackTrace"]:
        lines.append("Traceback (most recent call last):")
        lines.extend(s.rstrip("\n") for s in doc["stackTrace"])
    sys.stdout.write("\n".join(lines) + "\n")
    flush_output()


# ---------------------------------------------------------------------------
# INIT


def load_handler(handler):
    try:
        modname, fname = handler.rsplit(".", 1)
    except ValueError as e:
        raise FaultError("Runtime.MalformedHandlerName", "Bad handler '%s': %s" % (handler, e))
    if not modname or not fname:
        raise FaultError("Runtime.MalformedHandlerName", "Bad handler '%s': must be of the form file.function" % handler)
    # "dir/file.function" names the module dir.file, as on Lambda.
    modname = modname.replace("/", ".")
    try:
        module = importlib.import_module(modname)
    except SyntaxError as e:
        raise FaultError(
            "Runtime.UserCodeSyntaxError",
            "Syntax error in module '%s': %s" % (modname, e),
            user_stack(e.__traceback__),
        )
    except ImportError as e:
        raise FaultError(
            "Runtime.ImportModuleError",
            "Unable to import module '%s': %s" % (modname, e),
            user_stack(e.__traceback__),
        )
    # Any other exception raised by the module's top level is reported with
    # its own type by the caller.
    fn = getattr(module, fname, None)
    if fn is None:
        raise FaultError("Runtime.HandlerNotFound", "Handler '%s' missing on module '%s'" % (fname, modname))
    if not callable(fn):
        raise FaultError("Runtime.HandlerNotFound", "Handler '%s' on module '%s' is not callable" % (fname, modname))
    return fn


def init(api, handler_name):
    try:
        return load_handler(handler_name)
    except FaultError as e:
        doc = error_doc(e.error_type, e.message, e.tb or [])
    except Exception as e:  # the module's top level raised
        doc = error_doc(type(e).__name__, str(e), user_stack(e.__traceback__))
    log_error(doc)
    api.post_init_error(doc, doc["errorType"])
    sys.exit(1)


# ---------------------------------------------------------------------------
# Invocations


def json_default(obj):
    # Lambda's encoder serialises Decimal (e.g. from DynamoDB) as a number.
    if isinstance(obj, decimal.Decimal):
        return int(obj) if obj == obj.to_integral_value() else float(obj)
    raise TypeError("Object of type %s is not JSON serializable" % type(obj).__name__)


def invoke(api, fn, headers, body):
    global current_request_id
    request_id = headers.get("Lambda-Runtime-Aws-Request-Id", "")
    current_request_id = request_id
    trace_id = headers.get("Lambda-Runtime-Trace-Id")
    if trace_id:
        os.environ["_X_AMZN_TRACE_ID"] = trace_id
    else:
        os.environ.pop("_X_AMZN_TRACE_ID", None)
    try:
        deadline_ms = int(headers.get("Lambda-Runtime-Deadline-Ms", "0"))
    except ValueError:
        deadline_ms = 0

    try:
        # Lambda delivers {} when Invoke had no payload.
        event = json.loads(body) if body.strip() else {}
    except ValueError as e:
        doc = error_doc("Runtime.UnmarshalError", "Unable to unmarshal input: %s" % e, [], request_id)
        log_error(doc)
        api.post_error(request_id, doc, doc["errorType"])
        return

    context = LambdaContext(
        request_id,
        deadline_ms,
        headers.get("Lambda-Runtime-Invoked-Function-Arn"),
        decode_json_header(headers.get("Lambda-Runtime-Client-Context")),
        decode_json_header(headers.get("Lambda-Runtime-Cognito-Identity")),
    )
    try:
        result = fn(event, context)
    except Exception as e:
        doc = error_doc(type(e).__name__, str(e), user_stack(e.__traceback__), request_id)
        log_error(doc)
        api.post_error(request_id, doc, doc["errorType"])
        return
    try:
        payload = json.dumps(result, default=json_default).encode("utf-8")
    except (TypeError, ValueError, OverflowError) as e:
        doc = error_doc("Runtime.MarshalError", "Unable to marshal response: %s" % e, [], request_id)
        log_error(doc)
        api.post_error(request_id, doc, doc["errorType"])
        return
    # The function's output belongs to this invocation's log: it must reach
    # the agent before the response ends the invocation.
    flush_output()
    api.post_response(request_id, payload)


def snapshot_and_restore(api):
    """SnapStart: run the before-snapshot hooks, wait in /restore/next while
    the environment is saved, then, in each restored environment, re-seed
    Python's own random generator (it would otherwise draw the same numbers
    in every environment restored from one snapshot) and run the
    after-restore hooks. A failing hook is reported and ends the runtime.
    """
    import random

    import snapshot_restore_py

    try:
        snapshot_restore_py.run_before_snapshot()
    except Exception as e:
        doc = error_doc("Runtime.BeforeSnapshotError", str(e), traceback.format_exc().splitlines())
        api.post_init_error(doc, "Runtime.BeforeSnapshotError")
        sys.exit(1)
    api.restore_next()
    random.seed()  # from os.urandom, which the restored kernel has reseeded
    try:
        snapshot_restore_py.run_after_restore()
    except Exception as e:
        doc = error_doc("Runtime.AfterRestoreError", str(e), traceback.format_exc().splitlines())
        api.post_restore_error(doc, "Runtime.AfterRestoreError")
        sys.exit(1)


def main():
    # Output is line-buffered (and flushed before every post) so print()
    # lands in the log of the invocation that printed it.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass

    address = os.environ.get("AWS_LAMBDA_RUNTIME_API")
    handler_name = os.environ.get("_HANDLER", "")
    task_root = os.environ.get("LAMBDA_TASK_ROOT", "/var/task")
    if not address:
        sys.stderr.write("invokex runtime: AWS_LAMBDA_RUNTIME_API is not set\n")
        sys.exit(2)
    if task_root in sys.path:
        sys.path.remove(task_root)
    sys.path.insert(0, task_root)

    api = RuntimeAPI(address)
    setup_logging()
    fn = init(api, handler_name)
    if os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE") == "snap-start":
        snapshot_and_restore(api)

    while True:
        headers, body = api.next()
        invoke(api, fn, headers, body)
        flush_output()


if __name__ == "__main__":
    main()
