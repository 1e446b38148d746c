"""report.html's inline CSS and script (no external resource: the CSP forbids fetching any).

The script renders the prompt explorer from the JSON block `#difftest-data` (difftest.report.
explorer): one page of prompts at a time, worst first, with search (prompt id, text, tag) and
filters (failed requests, diverged, tag). Untrusted text (prompts, tokens) only ever reaches the
DOM through `textContent`, never `innerHTML`, so a prompt reading `<script>` stays text.
"""

from __future__ import annotations

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
:root{--pass:#1b7a34;--fail:#c62828;--inc:#b26a00;--mut:#666;--line:#ddd}
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;padding:12px 20px;
color:#1d1d1d;max-width:1320px}
h1{font-size:20px;margin:4px 0}h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:14px 0 4px}h4{font-size:14px;margin:10px 0 4px}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid var(--line);padding:2px 7px;text-align:left;
vertical-align:top}th{background:#f4f4f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12.5px}
.badge{display:inline-block;color:#fff;font-weight:700;border-radius:3px;padding:0 7px;font-size:13px;
letter-spacing:.02em}
.b-PASS{background:var(--pass)}.b-FAIL,.b-NO-VERDICT,.b-INFRASTRUCTURE{background:var(--fail)}.b-INCONCLUSIVE{background:var(--inc)}
.t-PASS{color:var(--pass);font-weight:700}.t-FAIL,.t-NO-VERDICT,.t-NO{color:var(--fail);font-weight:700}
.t-INCONCLUSIVE,.t-undecided{color:var(--inc);font-weight:700}
.gate{font-size:15px;margin:2px 0 8px}.meta{color:var(--mut);font-size:12.5px}
.cards{display:flex;flex-direction:column;gap:6px}
.card{border:1px solid var(--line);border-left:6px solid var(--mut);border-radius:4px;padding:6px 10px;
display:grid;grid-template-columns:1fr 170px;grid-template-rows:auto 1fr;gap:2px 14px}
.card.s-PASS{border-left-color:var(--pass)}.card.s-FAIL,.card.s-NO-VERDICT{border-left-color:var(--fail)}
.card.s-INCONCLUSIVE{border-left-color:var(--inc)}
.card .head{font-size:15px}.card .head a{color:inherit}.card ul{margin:2px 0 2px 18px;padding:0}
.card li{margin:1px 0}.card .spark{display:block}.card .sp{grid-row:1 / span 2;grid-column:2;font-size:11px;
color:var(--mut)}.card .where{background:#fff4e5;border-left:3px solid #e65100;padding:2px 8px;margin:3px 0}
.ni{color:#888}.ni .tag{border:1px solid #bbb;border-radius:3px;font-size:11px;padding:0 3px;margin-left:4px}
.unexp{color:var(--fail);font-weight:700}.ok{color:var(--pass)}
.plots{display:flex;flex-wrap:wrap;gap:10px 18px}.plot{margin:0}.plot figcaption{font-size:12px;color:#555;
max-width:560px}.plot svg{max-width:100%;height:auto;border:1px solid #eee}
.warn{color:#8a5a00}
.tplots{margin:6px 0}.tplots summary{cursor:pointer;font-size:15px;margin:6px 0}
.ctl{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid var(--line);z-index:2;
display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center}
.ctl input[type=search]{width:20em}
.prompt{border:1px solid var(--line);border-radius:4px;margin:8px 0;padding:6px 8px}
.prompt.f{border-left:5px solid var(--fail)}.prompt.d{border-left:5px solid var(--inc)}
.ph{font-size:13px;color:#333}.ph b{font-size:14px}.ph .tg{background:#eef;border-radius:3px;padding:0 4px;
margin-left:3px;font-size:11.5px}
.ptext{white-space:pre-wrap;background:#f7f7f7;padding:3px 6px;margin:4px 0;font-size:12.5px;max-height:5.5em;
overflow:auto}
.diff{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;line-height:1.9;
white-space:pre-wrap;word-break:break-word}
.diff span.tok{border-bottom:3px solid transparent;padding:0 1px}
.del{background:#ffd7d5;text-decoration:line-through;text-decoration-color:#a00}
.ins{background:#ccf0cf}
.diff .first{outline:2px solid var(--fail);outline-offset:1px}
.lab{font-size:11.5px;color:var(--mut);margin-right:6px}
.alts{display:flex;gap:24px;flex-wrap:wrap;margin:4px 0}.alts table{font-size:12.5px}
.alts td.tok{font-family:ui-monospace,monospace;white-space:pre}.alts tr.chosen td{font-weight:700}
.pager{display:flex;gap:8px;align-items:center;margin:6px 0}
.legend span{padding:0 4px;margin-right:6px}.garbled{color:var(--fail);font-weight:700}
.muted{color:var(--mut)}
"""

JS = r"""
(function(){
'use strict';
var D=null,state={c:0,q:'',failed:false,div:false,tag:'',page:0},SIZE=25,HAY=null;
var KIND={W:'WRONG',D:'DRIFT',T:'TIE',L:'LENGTH'};
function $(id){return document.getElementById(id);}
function el(tag,cls,text){var e=document.createElement(tag);if(cls){e.className=cls;}
  if(text!==undefined&&text!==null){e.textContent=String(text);}return e;}
function num(x,pct){if(x===null||x===undefined){return 'n/a';}if(typeof x==='string'){return x;}
  if(pct){return (100*x).toFixed(1)+'%';}if(x===0){return '0';}
  var a=Math.abs(x);return (a>=1e-3&&a<1e5)?String(+x.toPrecision(4)):x.toExponential(2);}
function vis(s){return String(s).replace(/\r\n|\n|\r/g,'\u23ce').replace(/\t/g,'\u21e5');}
function klStyle(k){if(k===null||k===undefined){return '';}if(typeof k==='string'){return '#d100d1';}
  if(k<=1e-3){return '';}var a=Math.min(1,(Math.log10(k)+3)/3);return 'rgba(220,50,47,'+(0.25+0.75*a).toFixed(2)+')';}
function haystack(){HAY=D.prompts.map(function(p){
  return (p[0]+'\u0000'+p[1]+'\u0000'+p[2].map(function(t){return D.tags[t];}).join(' ')).toLowerCase();});}
function matches(){var c=D.cmps[state.c],q=state.q.toLowerCase(),tag=state.tag===''?-1:+state.tag,out=[];
  for(var i=0;i<c.rows.length;i++){var r=c.rows[i];
    if(state.failed&&!(r[1]&1)){continue;}
    if(state.div&&!(r[1]&2)){continue;}
    if(tag>=0&&D.prompts[r[0]][2].indexOf(tag)<0){continue;}
    if(q&&HAY[r[0]].indexOf(q)<0){continue;}
    out.push(i);}
  return out;}
function tokSpan(text,cls,kl,id){var s=el('span','tok'+(cls?' '+cls:''),vis(text===''?'\u2205':text));
  var col=klStyle(kl),why=[];if(col){s.style.borderBottomColor=col;}
  if(text===''){why.push((id!==undefined?'id '+id+': ':'')+'no text of its own: a byte piece of a multi-byte character, or a special token');}
  if(kl!==null&&kl!==undefined){why.push('teacher-forced KL '+num(kl)+' nats');}
  if(why.length){s.title=why.join(' \u00b7 ');}return s;}
function diffView(d,fd){var box=el('div','diff'),ri=d.ri||{},ti=d.ti||{};
  if(!d.o){return box;}
  d.o.forEach(function(o){var op=o[0],i,s;
    if(op===0){for(i=o[1];i<o[2];i++){box.appendChild(tokSpan(d.r[i],'',d.k?d.k[i]:null,ri[i]));}return;}
    if(op===1||op===2){for(i=o[1];i<o[2];i++){s=tokSpan(d.r[i],'del',d.k?d.k[i]:null,ri[i]);
      s.title=(s.title?s.title+' \u00b7 ':'')+'reference only (deleted in the target)';
      if(i===fd){s.classList.add('first');}box.appendChild(s);}}
    if(op===1||op===3){for(i=o[3];i<o[4];i++){s=tokSpan(d.t[i],'ins',null,ti[i]);
      s.title=(s.title?s.title+' \u00b7 ':'')+'target only (inserted)';
      if(i===fd&&op===3){s.classList.add('first');}box.appendChild(s);}}
  });return box;}
function altTable(title,alts,chosen){var t=el('table'),h=el('tr');
  h.appendChild(el('th','',title));h.appendChild(el('th','','logprob'));t.appendChild(h);
  alts.forEach(function(a){var tr=el('tr',a[0]===chosen?'chosen':'');
    var shown=/^\s+$/.test(a[0])?a[0].replace(/ /g,'\u2423'):a[0];
    var td=el('td','tok',a[2]?'\u201c'+vis(shown)+'\u201d':a[0]);if(!a[2]){td.className='tok muted';}
    if(/^id -?\d+$/.test(a[0])){td.title='no text: this id was not generated anywhere in the run, and the report '+
      'asks no server (compare --prompt shows its text via /detokenize)';}
    tr.appendChild(td);tr.appendChild(el('td','n',num(a[1])));t.appendChild(tr);});return t;}
function card(c,rank,r){var p=D.prompts[r[0]],d=r[7]>=0?c.details[r[7]]:null,fd=r[4];
  var box=el('div','prompt'+((r[1]&1)?' f':((r[1]&2)?' d':'')));box.setAttribute('data-id',p[0]);
  var h=el('div','ph');h.appendChild(el('span','muted','#'+(rank+1)+' '));h.appendChild(el('b','',p[0]));
  p[2].forEach(function(t){h.appendChild(el('span','tg',D.tags[t]));});
  var bits=[' \u00b7 mean KL '+num(r[2]),'token match '+num(r[3],true),'top-1 '+num(r[6],true),
    fd===null?'no divergence':'first divergence at token '+fd+(r[5]?' ('+(KIND[r[5]]||r[5])+')':'')];
  h.appendChild(el('span','',bits.join(' \u00b7 ')));
  if(r[1]&4){h.appendChild(el('span','garbled',' \u00b7 garbled'));}
  box.appendChild(h);
  box.appendChild(el('div','ptext',d&&d.p?d.p:p[1]));
  if(!d){box.appendChild(el('div','muted','Token detail not embedded: report.html carries it for the worst '+
    D.detail_per_comparison+' prompts per comparison; every number is in report.json.'));return box;}
  if(d.e){box.appendChild(el('div','t-FAIL','failed request: '+d.e));}
  if(d.o){box.appendChild(el('div','lab','reference \u2192 target, aligned:'));box.appendChild(diffView(d,fd));}
  else if(d.rt!==undefined||d.tt!==undefined){box.appendChild(el('div','ptext','reference: '+(d.rt||'')));
    box.appendChild(el('div','ptext','target: '+(d.tt||'')));}
  if(fd!==null&&(d.ra||d.ta)){var a=el('div','alts');
    var rc=d.rc||(d.r&&fd<d.r.length?d.r[fd]:null),tc=d.tc||(d.t&&fd<d.t.length?d.t[fd]:null);
    var said=function(x,label){return label?x:'\u201c'+vis(x===null?'(end)':x)+'\u201d';};
    var s=el('div','');s.appendChild(el('div','', 'At token '+fd+' the reference chose '+said(rc,d.rc)+
      ', the target '+said(tc,d.tc)+'. Top alternatives there:'));a.appendChild(s);
    if(d.ra){a.appendChild(altTable('reference top',d.ra,rc));}
    if(d.ta){a.appendChild(altTable('target top',d.ta,tc));}
    box.appendChild(a);}
  return box;}
function render(){var c=D.cmps[state.c],m=matches(),pages=Math.max(1,Math.ceil(m.length/SIZE));
  if(state.page>=pages){state.page=pages-1;}
  var list=$('plist');list.textContent='';
  var start=state.page*SIZE,frag=document.createDocumentFragment();
  for(var k=start;k<Math.min(m.length,start+SIZE);k++){frag.appendChild(card(c,m[k],c.rows[m[k]]));}
  list.appendChild(frag);
  var txt=m.length+' of '+c.n+' prompts match \u00b7 page '+(state.page+1)+' of '+pages;
  document.querySelectorAll('.pinfo').forEach(function(e){e.textContent=txt;});
  document.querySelectorAll('.prev').forEach(function(e){e.disabled=state.page<=0;});
  document.querySelectorAll('.next').forEach(function(e){e.disabled=state.page>=pages-1;});
  if(m.length===0){list.appendChild(el('p','muted','No prompt matches these filters.'));}}
function init(){var node=$('difftest-data');if(!node){return;}
  D=JSON.parse(node.textContent);haystack();
  var sel=$('cmp');D.cmps.forEach(function(c,i){var o=el('option','',c.target+' \u00b7 '+c.kind+' vs '+c.baseline+
    (c.status?' ('+c.status+')':'')+' \u00b7 '+c.n+' prompts');o.value=String(i);sel.appendChild(o);});
  state.c=+(sel.getAttribute('data-default')||0);sel.value=String(state.c);
  var tg=$('f-tag');D.tags.forEach(function(t,i){var o=el('option','',t);o.value=String(i);tg.appendChild(o);});
  sel.addEventListener('change',function(){state.c=+sel.value;state.page=0;render();});
  $('q').addEventListener('input',function(){state.q=this.value;state.page=0;render();});
  $('f-failed').addEventListener('change',function(){state.failed=this.checked;state.page=0;render();});
  $('f-div').addEventListener('change',function(){state.div=this.checked;state.page=0;render();});
  tg.addEventListener('change',function(){state.tag=this.value;state.page=0;render();});
  document.querySelectorAll('.prev').forEach(function(b){b.addEventListener('click',function(){state.page--;render();});});
  document.querySelectorAll('.next').forEach(function(b){b.addEventListener('click',function(){state.page++;render();});});
  render();document.body.setAttribute('data-ready','1');}
if(document.readyState==='loading'){document.addEventListener('DOMContentLoaded',init);}else{init();}
})();
"""
