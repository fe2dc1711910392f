// Sends identify, track, page and a batch with the real @segment/analytics-node SDK.
// Environment: CDP_HTTP, CDP_WRITE_KEY, CDP_USER_ID, CDP_EMAIL, CDP_ORDER_ID.
const { Analytics } = require('@segment/analytics-node')

const errors = []
const analytics = new Analytics({
  writeKey: process.env.CDP_WRITE_KEY,
  host: process.env.CDP_HTTP,
  maxEventsInBatch: 10,
  flushInterval: 200,
  maxRetries: 1,
})
analytics.on('error', (err) => errors.push(String(err && (err.reason || err.message || err.code) || err)))

const userId = process.env.CDP_USER_ID
analytics.identify({ userId, traits: { email: process.env.CDP_EMAIL, name: 'Lê Thị Hoa' } })
analytics.track({ userId, event: 'Order Completed',
  properties: { order_id: process.env.CDP_ORDER_ID, total: 990000, currency: 'VND' } })
analytics.page({ userId, name: 'Home', properties: { path: '/' } })
for (let i = 0; i < 20; i++) {
  analytics.track({ userId, event: 'Product Viewed', properties: { product_id: `SKU-${i}` } })
}
analytics.closeAndFlush({ timeout: 10000 }).then(() => {
  if (errors.length) {
    console.error('errors:', errors)
    process.exit(1)
  }
  console.log('sent')
})
