// An agent uses the console in headless Chromium: signs in, looks a customer
// up by phone, and sees the orders and the open ticket; then the page updates
// live when a new order lands (the test sends it when this script says WAITING).
// Environment: CDP_HTTP, CDP_AGENT_TOKEN, CDP_PHONE, CDP_SCREENSHOT (optional).
const { chromium } = require('playwright-core')

const fail = (msg) => { console.error(msg); process.exit(1) }

;(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  })
  try {
    const page = await browser.newPage()
    await page.goto(process.env.CDP_HTTP + '/console')
    // A wrong token is refused.
    await page.fill('#token', 'wrong-token-123')
    await page.click('#login-button')
    await page.waitForSelector('#login-error:has-text("unknown agent token")', { timeout: 10000 })
    await page.fill('#token', process.env.CDP_AGENT_TOKEN)
    await page.click('#login-button')
    await page.waitForSelector('#finder:not(.hidden)', { timeout: 10000 })
    await page.fill('#q', process.env.CDP_PHONE)
    await page.click('#search-button')
    await page.waitForSelector('#profile:not(.hidden)', { timeout: 10000 })
    const orders = await page.textContent('[data-metric="orders"] b')
    const open = await page.textContent('[data-metric="open-tickets"] b')
    const tickets = await page.textContent('#tickets')
    console.log(JSON.stringify({ orders, open, tickets }))
    if (orders.trim() !== '2') fail('expected 2 orders, saw ' + orders)
    if (open.trim() !== '1') fail('expected 1 open ticket, saw ' + open)
    if (!tickets.includes('OPEN')) fail('the open ticket is not shown: ' + tickets)
    if (process.env.CDP_SCREENSHOT) await page.screenshot({ path: process.env.CDP_SCREENSHOT, fullPage: true })
    // Live: the test sends a third order now.
    console.log('WAITING')
    await page.waitForSelector('[data-metric="orders"] b:has-text("3")', { timeout: 20000 })
    console.log('LIVE OK')
  } finally {
    await browser.close()
  }
})().catch((e) => fail(String(e && e.stack || e)))
