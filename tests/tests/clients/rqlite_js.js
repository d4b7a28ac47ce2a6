// rqlite-js (rqlite's JavaScript client, from npm) against Cairn. Run by
// t19_rqlite_clients.rs: node rqlite_js.js URL[,URL...] TABLE
// Prints one "OK <check>" line per check; a failure exits non-zero.
const { DataApiClient, StatusApiClient } = require('rqlite-js')

const [hosts, table] = process.argv.slice(2)
const ok = (what) => console.log('OK ' + what)
const fail = (what) => { console.error('FAIL ' + what); process.exit(1) }

async function main () {
  const data = new DataApiClient(hosts.split(','))
  let r = await data.execute(`CREATE TABLE ${table} (id INTEGER PRIMARY KEY, name TEXT, v REAL)`)
  if (r.hasError()) fail('create: ' + JSON.stringify(r.getFirstError()))
  r = await data.execute([
    [`INSERT INTO ${table}(name, v) VALUES(?, ?)`, 'fiona', 1.5],
    [`INSERT INTO ${table}(name, v) VALUES(:name, :v)`, { name: 'declan', v: 2 }]
  ])
  if (r.hasError()) fail('insert: ' + JSON.stringify(r.getFirstError()))
  if (r.get(1).getLastInsertId() !== 2) fail('last insert id ' + r.get(1).getLastInsertId())
  ok('execute')
  for (const level of ['none', 'weak', 'linearizable', 'strong']) {
    r = await data.query(`SELECT id, name, v FROM ${table} ORDER BY id`, { level })
    if (r.hasError()) fail(level + ': ' + JSON.stringify(r.getFirstError()))
    const rows = r.toArray()
    if (level !== 'none' && (rows.length !== 2 || rows[1].name !== 'declan' || rows[0].v !== 1.5)) {
      fail(level + ' rows ' + JSON.stringify(rows))
    }
  }
  ok('query at every level')
  r = await data.execute(`INSERT INTO nope VALUES(1)`)
  if (!r.hasError()) fail('no error for a missing table')
  ok('errors')
  const status = new StatusApiClient(hosts.split(','))
  const s = await status.status()
  if (!s.body || !s.body.store || !s.body.store.raft) fail('status ' + JSON.stringify(s.body))
  ok('status')
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)))
