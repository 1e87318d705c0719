"""Findings -> alerts: transitions (fire/resolve, damped), the journal, push delivery, and
``alerts.json``.

- :mod:`~tfgpud.alerts.transitions`: each poll's findings become ``firing``/``resolved`` events,
  each logged to the journal with its code's MESSAGE_ID.
- :mod:`~tfgpud.alerts.sinks`: the :class:`Sink` protocol (Alertmanager, webhook) and the
  :class:`SinkWorker` that delivers to one sink from its own bounded queue and thread.
- :mod:`~tfgpud.alerts.store`: the firing set and undelivered messages across restarts.
- :mod:`~tfgpud.alerts.dispatcher`: :class:`AlertDispatcher`, the per-poll glue.
"""

from tfgpud.alerts.dispatcher import REMOVED_SINK, AlertDispatcher
from tfgpud.alerts.sinks import (
    AlertmanagerSink,
    Delivery,
    Request,
    Sink,
    SinkWorker,
    WebhookSink,
    am_alert,
    http_post,
    webhook_event,
)
from tfgpud.alerts.store import ALERTS_FILE, SavedState, load_firing, load_state
from tfgpud.alerts.transitions import Alert, Transition, Transitions, log_transition
from tfgpud.codes import MESSAGE_IDS, message_id
from tfgpud.codes import alert_name as alertname

__all__ = [
    "ALERTS_FILE",
    "MESSAGE_IDS",
    "REMOVED_SINK",
    "Alert",
    "AlertDispatcher",
    "AlertmanagerSink",
    "Delivery",
    "Request",
    "SavedState",
    "Sink",
    "SinkWorker",
    "Transition",
    "Transitions",
    "WebhookSink",
    "alertname",
    "am_alert",
    "http_post",
    "load_firing",
    "load_state",
    "log_transition",
    "message_id",
    "webhook_event",
]
