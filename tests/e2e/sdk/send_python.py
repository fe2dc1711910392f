"""Sends identify, track, page and a batch with the real segment-analytics-python SDK.

Environment: CDP_HTTP (http://host:port), CDP_WRITE_KEY, CDP_USER_ID, CDP_EMAIL, CDP_ORDER_ID.
Exits non-zero if the SDK reports an error.
"""
import os
import sys

import segment.analytics as analytics

errors = []


def on_error(error, items):
    errors.append(f"{error} ({len(items)} items)")


analytics.write_key = os.environ["CDP_WRITE_KEY"]
analytics.host = os.environ["CDP_HTTP"]
analytics.on_error = on_error
analytics.gzip = True

user = os.environ["CDP_USER_ID"]
analytics.identify(user, {"email": os.environ["CDP_EMAIL"], "name": "Trần Văn Bình"})
analytics.track(user, "Order Completed",
                {"order_id": os.environ["CDP_ORDER_ID"], "total": 450000, "currency": "VND"})
analytics.page(user, "Shop", "Pricing", {"path": "/pricing"})
# A burst: the client sends these together as one /v1/batch request.
for i in range(20):
    analytics.track(user, "Product Viewed", {"product_id": f"SKU-{i}"})
analytics.flush()
analytics.shutdown()
if errors:
    print("errors:", errors)
    sys.exit(1)
print("sent")
