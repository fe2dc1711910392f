// The console in headless Chromium, as three people would use it:
// - a wrong key and an operator's key are refused;
// - an agent signs in, looks a customer up by phone, sees the orders and the
//   open ticket with the phone masked and no way to reveal it; then the page
//   updates live when a new order lands (the test sends it when this script
//   says WAITING);
// - a supervisor reveals the phone with a reason (refused without one).
// Environment: CDP_HTTP, CDP_AGENT_TOKEN, CDP_SUPERVISOR_TOKEN,
// CDP_OPERATOR_TOKEN, CDP_PHONE (as typed), CDP_PHONE_E164 (as stored),
// CDP_SCREENSHOT (optional).
const { chromium } = require('playwright-core')

const fail = (msg) => { console.error(msg); process.exit(1) }
const env = (name) => process.env[name] || fail('missing ' + name)

async function signIn(page, key, expectError) {
  await page.goto(env('CDP_HTTP') + '/console')
  await page.fill('#token', key)
  await page.click('#login-button')
  if (expectError) {
    await page.waitForSelector(`#login-error:has-text("${expectError}")`, { timeout: 10000 })
    return
  }
  await page.waitForSelector('#finder:not(.hidden)', { timeout: 10000 })
}

async function lookUp(page) {
  await page.fill('#q', env('CDP_PHONE'))
  await page.click('#search-button')
  await page.waitForSelector('#profile:not(.hidden)', { timeout: 10000 })
}

;(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  })
  try {
    const e164 = env('CDP_PHONE_E164')
    const national = '0' + e164.slice(3)
    const denied = await browser.newPage()
    await signIn(denied, 'wrong-key-123', 'unknown credential')
    await signIn(denied, env('CDP_OPERATOR_TOKEN'), 'does not use the console')
    console.log('DENIED OK')

    const page = await (await browser.newContext()).newPage()
    await signIn(page, env('CDP_AGENT_TOKEN'))
    await lookUp(page)
    const orders = await page.textContent('[data-metric="orders"] b')
    const open = await page.textContent('[data-metric="open-tickets"] b')
    const tickets = await page.textContent('#tickets')
    const ids = await page.textContent('#ids')
    const text = await page.textContent('body')
    console.log(JSON.stringify({ orders, open, tickets, ids }))
    if (orders.trim() !== '2') fail('expected 2 orders, saw ' + orders)
    if (open.trim() !== '1') fail('expected 1 open ticket, saw ' + open)
    if (!tickets.includes('OPEN')) fail('the open ticket is not shown: ' + tickets)
    // Consent: what the customer said on Zalo, and what they never granted.
    const zalo = await page.textContent('[data-consent="marketing:zalo"]')
    if (!zalo.includes('granted') || !zalo.includes('notice v3')) fail('the Zalo consent is not shown: ' + zalo)
    const absent = await page.textContent('#consent-absent')
    if (!absent.includes('analytics')) fail('never-granted purposes are not shown: ' + absent)
    // Audiences: the segment the customer is in, and the computed trait.
    if (!await page.isVisible('[data-segment="store_regulars"]')) fail('the segment is not shown')
    const trait = await page.textContent('[data-trait="store_orders"]')
    if (!trait.includes('2')) fail('the computed trait is not shown: ' + trait)
    const masked = national.slice(0, 4) + '***' + national.slice(-3)
    if (!ids.includes('phone: ' + masked)) fail('the phone is not masked as ' + masked + ': ' + ids)
    if (text.includes(e164) || text.includes(national)) fail('the agent sees the phone in clear')
    if (await page.isVisible('#reveal-phone')) fail('an agent is offered to reveal')
    if (process.env.CDP_SCREENSHOT) await page.screenshot({ path: process.env.CDP_SCREENSHOT, fullPage: true })
    // Live: the test sends a third order now.
    console.log('WAITING')
    await page.waitForSelector('[data-metric="orders"] b:has-text("3")', { timeout: 20000 })
    console.log('LIVE OK')

    const sup = await (await browser.newContext()).newPage()
    await signIn(sup, env('CDP_SUPERVISOR_TOKEN'))
    await lookUp(sup)
    await sup.click('#reveal-phone')
    await sup.waitForSelector('#reveal-error:has-text("reason")', { timeout: 10000 })
    await sup.fill('#reveal-reason', 'ticket 42: customer called back')
    await sup.click('#reveal-phone')
    await sup.waitForSelector(`#revealed:has-text("${e164}")`, { timeout: 10000 })
    console.log('REVEAL OK')
  } finally {
    await browser.close()
  }
})().catch((e) => fail(String(e && e.stack || e)))
