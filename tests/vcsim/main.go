// vcsim-cbt: govmomi's vCenter simulator (VPX model) on 127.0.0.1 over https, with what
// repo-engine's tests need and govmomi 0.24.2 lacks (see shared VMWARE.md):
//
//   - QueryChangedDiskAreas, answered by this wrapper: every snapshot created while a VM has
//     changeTrackingEnabled freezes each disk's data file and gives the disk a new changeId
//     ("<uuid>/<seq>"); a query compares the snapshot's frozen data with the data frozen at the
//     given changeId in 64 KiB blocks ("*": the non-zero blocks). One reply covers at most
//     -cbt-window bytes, so clients must page. Unknown changeId, deviceKey or startOffset ->
//     InvalidArgument with invalidProperty, as vSphere does.
//   - CreateSnapshot_Task: post-processed (freeze data, deep-copy the snapshot's disks, new
//     changeIds); a quiesce fault can be armed per VM.
//   - Delta disks: a snapshot moves each disk of the VM onto a new delta ("NAME-00000N.vmdk",
//     its data file a copy of the parent's, so a reader sees the whole disk through one file);
//     the snapshot's config keeps the parent, which no longer changes. Reverting to a snapshot
//     discards the VM's delta (it restarts as a copy of the snapshot's disk); removing the
//     current snapshot merges the VM's delta into the snapshot's disk, and the VM runs on that
//     again.
//   - RemoveSnapshot_Task / RevertToSnapshot_Task: the task's entity is rewritten to the VM
//     (pyvmomi rejects a snapshot there).
//   - Fetch of an unset property (vm.snapshot without snapshots) panics in the simulator: answered
//     with an empty FetchResponse.
//   - Disk data files are kept at the disk's capacity (sparse) after create/reconfigure.
//
// Test control (plain JSON over the same https port): POST /vcsim/control with
// {"vm": NAME, "quiesce_fault": bool, "cbt_supported": bool, "cbt_reset": bool,
//
//	"query_fault": "FileFault"|"SystemError"|"", "cbt_window": BYTES,
//	"drop_at": METHOD|"",   the session calling METHOD (e.g. "RevertToSnapshot_Task") loses its
//	                        connection there and on every later call (the call is not run;
//	                        another session, such as a test's own, still works)
//	"call_faults": {METHOD: FAULT|""}}   METHOD's call itself answers the vim fault FAULT
//	                        (NoPermission, SystemError, ...) without creating a task;
//
// GET /vcsim/info (per VM its disks: key, file, the data file the VM currently runs on, capacity).
//
// On start it prints one JSON line to stdout: url, host, port, user, password, thumbprint (SHA-1
// of the certificate, xx:xx:..), datastores (name -> local directory), and runs until stdin closes
// or it gets SIGTERM/SIGINT.
package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"encoding/json"
	"encoding/xml"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const cbtBlock = 64 << 10

var (
	cbtWindow = flag.Int64("cbt-window", 0, "most bytes one QueryChangedDiskAreas reply covers (0: all)")
	diskMiB   = flag.Int64("disk-mib", 0, "set every VM's disks to this capacity at start (0: keep)")
	dataKind  = flag.String("data-file", "flat", "which file holds a disk's data: flat (NAME-flat.vmdk) or descriptor (NAME.vmdk)")
	dsRoot    = flag.String("ds-root", "", "make DIR/<datastore name> symlinks to the datastores' directories")
	machines  = flag.Int("vms", 2, "VMs per host and per cluster resource pool")
	user      = flag.String("user", "user", "login user")
	password  = flag.String("password", "pass", "login password")
)

// fetchReq is the simulator's internal Fetch request (its type lives in an internal package).
type fetchReq struct {
	This types.ManagedObjectReference `xml:"_this"`
	Prop string                       `xml:"prop"`
}

type epoch struct {
	uuid string
	seq  int
}

type vmControl struct {
	quiesceFault bool
	queryFault   string
}

// cbt is all the change-tracking state the simulator itself does not have.
type cbt struct {
	mu        sync.Mutex
	frozen    map[string][]byte           // "vm/key/changeId" -> the disk's data at that changeId
	snapDisks map[string]map[int32]string // snapshot moref -> deviceKey -> changeId ("" untracked)
	snapVM    map[string]string           // snapshot moref -> vm moref
	epochs    map[string]*epoch           // "vm/key" -> current change-tracking epoch
	snapFiles map[string]map[int32]string // snapshot moref -> deviceKey -> the disk it froze
	control   map[string]*vmControl       // VM name -> armed faults
	window    int64
	dropAt    string            // SOAP method at which the calling session's connection drops
	dead      map[string]bool   // session cookies whose connection dropped
	faults    map[string]string // SOAP method -> fault its call answers
}

var state = &cbt{
	frozen:    map[string][]byte{},
	snapDisks: map[string]map[int32]string{},
	snapVM:    map[string]string{},
	snapFiles: map[string]map[int32]string{},
	epochs:    map[string]*epoch{},
	control:   map[string]*vmControl{},
	dead:      map[string]bool{},
	faults:    map[string]string{},
}

func (c *cbt) ctl(vm string) *vmControl {
	v := c.control[vm]
	if v == nil {
		v = &vmControl{}
		c.control[vm] = v
	}
	return v
}

func newUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	parts := make([]string, 16)
	for i := range b {
		parts[i] = fmt.Sprintf("%02x", b[i])
	}
	return strings.Join(parts[:8], " ") + "-" + strings.Join(parts[8:], " ")
}

// ---- disks and their data files ----

func vmByRef(ref types.ManagedObjectReference) *simulator.VirtualMachine {
	vm, _ := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	return vm
}

func disksOf(devices []types.BaseVirtualDevice) []*types.VirtualDisk {
	var out []*types.VirtualDisk
	for _, d := range devices {
		if disk, ok := d.(*types.VirtualDisk); ok {
			out = append(out, disk)
		}
	}
	return out
}

func capacityOf(disk *types.VirtualDisk) int64 {
	if disk.CapacityInBytes != 0 {
		return disk.CapacityInBytes
	}
	return disk.CapacityInKB * 1024
}

func backingFile(disk *types.VirtualDisk) string {
	if b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
		return b.GetVirtualDeviceFileBackingInfo().FileName
	}
	return ""
}

// dataPath maps "[ds] dir/name.vmdk" to the local file that holds the disk's bytes.
func dataPath(vm *simulator.VirtualMachine, fileName string) (string, error) {
	var p object.DatastorePath
	if !p.FromString(fileName) {
		return "", fmt.Errorf("bad datastore path %q", fileName)
	}
	host := simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem)
	ds, ok := simulator.Map.FindByName(p.Datastore, host.Datastore).(*simulator.Datastore)
	if !ok {
		return "", fmt.Errorf("no datastore %q", p.Datastore)
	}
	name := p.Path
	if *dataKind == "flat" {
		name = strings.TrimSuffix(name, ".vmdk") + "-flat.vmdk"
	}
	return path.Join(ds.Info.GetDatastoreInfo().Url, name), nil
}

// syncSizes grows (sparsely) every disk data file of vm to its disk's capacity.
func syncSizes(vm *simulator.VirtualMachine) {
	for _, disk := range disksOf(vm.Config.Hardware.Device) {
		p, err := dataPath(vm, backingFile(disk))
		if err != nil {
			log.Print(err)
			continue
		}
		st, err := os.Stat(p)
		want := capacityOf(disk)
		if err == nil && st.Size() >= want {
			continue
		}
		_ = os.MkdirAll(path.Dir(p), 0o755)
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			log.Print(err)
			continue
		}
		_ = f.Truncate(want)
		_ = f.Close()
	}
}

func readData(vm *simulator.VirtualMachine, disk *types.VirtualDisk) []byte {
	capacity := capacityOf(disk)
	buf := make([]byte, capacity)
	p, err := dataPath(vm, backingFile(disk))
	if err != nil {
		log.Print(err)
		return buf
	}
	f, err := os.Open(p)
	if err != nil {
		return buf
	}
	defer f.Close()
	_, _ = io.ReadFull(f, buf)
	return buf
}

// ---- SOAP plumbing ----

type envelope struct {
	XMLName xml.Name    `xml:"soapenv:Envelope"`
	Env     string      `xml:"xmlns:soapenv,attr"`
	XSD     string      `xml:"xmlns:xsd,attr"`
	XSI     string      `xml:"xmlns:xsi,attr"`
	Body    interface{} `xml:"soapenv:Body"`
}

type resBody struct {
	Res interface{}
}

func (r *resBody) MarshalXML(e *xml.Encoder, start xml.StartElement) error {
	if err := e.EncodeToken(start); err != nil {
		return err
	}
	name := reflect.TypeOf(r.Res).Elem().Name()
	if err := e.EncodeElement(r.Res, xml.StartElement{Name: xml.Name{Space: "urn:vim25", Local: name}}); err != nil {
		return err
	}
	return e.EncodeToken(start.End())
}

func writeResponse(w http.ResponseWriter, res interface{}) {
	var out bytes.Buffer
	out.WriteString(xml.Header)
	err := xml.NewEncoder(&out).Encode(&envelope{
		Env:  "http://schemas.xmlsoap.org/soap/envelope/",
		XSD:  "http://www.w3.org/2001/XMLSchema",
		XSI:  "http://www.w3.org/2001/XMLSchema-instance",
		Body: &resBody{res},
	})
	if err != nil {
		log.Printf("encoding %T: %s", res, err)
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(out.Bytes())
}

// writeFault answers a vim fault; detail is the inner XML of the fault element.
func writeFault(w http.ResponseWriter, kind, msg, detail string) {
	var b bytes.Buffer
	b.WriteString(xml.Header)
	b.WriteString(`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" ` +
		`xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">` +
		`<soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>`)
	_ = xml.EscapeText(&b, []byte(msg))
	fmt.Fprintf(&b, `</faultstring><detail><%sFault xmlns="urn:vim25" xsi:type="%s">%s</%sFault></detail>`+
		`</soapenv:Fault></soapenv:Body></soapenv:Envelope>`, kind, kind, detail, kind)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	_, _ = w.Write(b.Bytes())
}

func invalidArgument(w http.ResponseWriter, prop, msg string) {
	writeFault(w, "InvalidArgument", msg, "<invalidProperty>"+prop+"</invalidProperty>")
}

func typeFunc(name string) (reflect.Type, bool) {
	if name == "Fetch" {
		return reflect.TypeOf(fetchReq{}), true
	}
	return types.TypeFunc()(name)
}

// taskOf reads the task moref out of a recorded *_Task response.
func taskOf(rec *httptest.ResponseRecorder) *simulator.Task {
	var doc struct {
		Body struct {
			Inner struct {
				Returnval types.ManagedObjectReference `xml:"returnval"`
			} `xml:",any"`
		} `xml:"Body"`
	}
	if rec.Code != http.StatusOK || xml.Unmarshal(rec.Body.Bytes(), &doc) != nil {
		return nil
	}
	task, _ := simulator.Map.Get(doc.Body.Inner.Returnval).(*simulator.Task)
	return task
}

func copyRecorded(w http.ResponseWriter, rec *httptest.ResponseRecorder) {
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

// ---- the wrapper ----

type wrapper struct {
	inner http.Handler
	mu    sync.Mutex // one SOAP call at a time: tests are serial, and it keeps the CBT model simple
}

func (h *wrapper) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/vcsim/control":
		control(w, r)
		return
	case "/vcsim/info":
		info(w)
		return
	}
	if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/sdk") {
		h.inner.ServeHTTP(w, r)
		return
	}
	body, err := ioutil.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	r.Body = ioutil.NopCloser(bytes.NewReader(body))
	method, err := simulator.UnmarshalBody(typeFunc, body)
	if err != nil { // let the simulator produce its own fault
		h.inner.ServeHTTP(w, r)
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if injected(w, r, method.Body) {
		return
	}
	switch req := method.Body.(type) {
	case *types.QueryChangedDiskAreas:
		queryChangedDiskAreas(w, req)
	case *types.CreateSnapshot_Task:
		h.createSnapshot(w, r, req)
	case *types.RemoveSnapshot_Task:
		h.snapshotTask(w, r, req.This, true)
	case *types.RevertToSnapshot_Task:
		h.snapshotTask(w, r, req.This, false)
	case *types.ReconfigVM_Task:
		h.reconfigure(w, r, req)
	case *types.CreateVM_Task:
		h.createVM(w, r)
	case *fetchReq:
		h.fetch(w, r)
	default:
		h.inner.ServeHTTP(w, r)
	}
}

// injected answers a call the test armed a fault for: a dropped connection or a vim fault from
// the call itself. It returns whether it answered.
func injected(w http.ResponseWriter, r *http.Request, body interface{}) bool {
	name := reflect.TypeOf(body).Elem().Name()
	session := r.Header.Get("Cookie")
	state.mu.Lock()
	if name == state.dropAt && session != "" {
		state.dead[session] = true
	}
	drop := session != "" && state.dead[session]
	fault := state.faults[name]
	state.mu.Unlock()
	if drop {
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				_ = conn.Close()
				return true
			}
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		return true
	}
	if fault != "" {
		writeFault(w, fault, "injected "+fault+" for "+name, faultDetail(fault))
		return true
	}
	return false
}

// faultDetail fills the properties pyvmomi requires of a fault.
func faultDetail(kind string) string {
	switch kind {
	case "SystemError":
		return "<reason>simulated system error</reason>"
	case "NoPermission":
		return "<object type=\"Folder\">group-d1</object><privilegeId>VirtualMachine.State.RevertToSnapshot</privilegeId>"
	}
	return ""
}

func (h *wrapper) record(r *http.Request) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.inner.ServeHTTP(rec, r)
	return rec
}

func (h *wrapper) fetch(w http.ResponseWriter, r *http.Request) {
	rec := httptest.NewRecorder()
	panicked := func() (p bool) {
		defer func() {
			if recover() != nil {
				p = true
			}
		}()
		h.inner.ServeHTTP(rec, r)
		return false
	}()
	if panicked { // an unset property: answer "no value"
		var b bytes.Buffer
		b.WriteString(xml.Header)
		b.WriteString(`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">` +
			`<soapenv:Body><FetchResponse xmlns="urn:vim25"></FetchResponse></soapenv:Body></soapenv:Envelope>`)
		w.Header().Set("Content-Type", "text/xml; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(b.Bytes())
		return
	}
	copyRecorded(w, rec)
}

func (h *wrapper) createSnapshot(w http.ResponseWriter, r *http.Request, req *types.CreateSnapshot_Task) {
	vm := vmByRef(req.This)
	if vm == nil {
		h.inner.ServeHTTP(w, r)
		return
	}
	state.mu.Lock()
	armed := req.Quiesce && state.ctl(vm.Name).quiesceFault
	state.mu.Unlock()
	if armed {
		task := simulator.CreateTask(vm, "createSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
			return nil, &types.ApplicationQuiesceFault{SnapshotFault: types.SnapshotFault{}}
		})
		writeResponse(w, &types.CreateSnapshot_TaskResponse{Returnval: task.Run()})
		return
	}
	rec := h.record(r)
	task := taskOf(rec)
	if task != nil && task.Info.State == types.TaskInfoStateSuccess {
		if ref, ok := task.Info.Result.(types.ManagedObjectReference); ok {
			freeze(vm, ref)
		}
	}
	copyRecorded(w, rec)
}

// freeze gives the new snapshot its own copy of the disks with new changeIds and keeps the data.
func freeze(vm *simulator.VirtualMachine, snapRef types.ManagedObjectReference) {
	snap, ok := simulator.Map.Get(snapRef).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	state.mu.Lock()
	defer state.mu.Unlock()
	simulator.Map.WithLock(vm, func() {
		tracked := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		keys := map[int32]string{}
		files := map[int32]string{}
		devices := make([]types.BaseVirtualDevice, 0, len(vm.Config.Hardware.Device))
		for _, d := range vm.Config.Hardware.Device {
			disk, ok := d.(*types.VirtualDisk)
			if !ok {
				devices = append(devices, d)
				continue
			}
			cid := ""
			if tracked {
				ek := vm.Self.Value + "/" + strconv.Itoa(int(disk.Key))
				ep := state.epochs[ek]
				if ep == nil {
					ep = &epoch{uuid: newUUID()}
					state.epochs[ek] = ep
				}
				ep.seq++
				cid = fmt.Sprintf("%s/%d", ep.uuid, ep.seq)
				state.frozen[ek+"/"+cid] = readData(vm, disk)
			}
			keys[disk.Key] = cid
			setChangeID(disk, cid)
			files[disk.Key] = backingFile(disk)
			clone := *disk
			clone.CapacityInBytes = capacityOf(disk)
			clone.Backing = cloneBacking(disk.Backing)
			devices = append(devices, &clone)
		}
		hw := snap.Config.Hardware
		hw.Device = devices
		snap.Config.Hardware = hw
		state.snapDisks[snapRef.Value] = keys
		state.snapVM[snapRef.Value] = vm.Self.Value
		state.snapFiles[snapRef.Value] = files
		for _, disk := range disksOf(vm.Config.Hardware.Device) {
			onDelta(vm, disk)
		}
	})
}

// onDelta moves a disk of vm onto a new delta: "[ds] dir/name.vmdk" (or a delta of it) ->
// "[ds] dir/name-00000N.vmdk" with the first N not in use, its data a copy of the parent's.
func onDelta(vm *simulator.VirtualMachine, disk *types.VirtualDisk) {
	parent := backingFile(disk)
	stem := strings.TrimSuffix(parent, ".vmdk")
	if i := strings.LastIndex(stem, "-"); i > 0 && len(stem)-i == 7 {
		if _, err := strconv.Atoi(stem[i+1:]); err == nil {
			stem = stem[:i]
		}
	}
	for n := 1; ; n++ {
		name := fmt.Sprintf("%s-%06d.vmdk", stem, n)
		p, err := dataPath(vm, name)
		if err != nil {
			log.Print(err)
			return
		}
		if _, err := os.Stat(p); err == nil {
			continue
		}
		copyData(vm, parent, name)
		setBackingFile(disk, name)
		return
	}
}

// copyData makes the data file of `to` a copy of the data file of `from`.
func copyData(vm *simulator.VirtualMachine, from, to string) {
	src, err1 := dataPath(vm, from)
	dst, err2 := dataPath(vm, to)
	if err1 != nil || err2 != nil {
		log.Print(err1, err2)
		return
	}
	data, err := ioutil.ReadFile(src)
	if err != nil {
		log.Print(err)
		return
	}
	if err := ioutil.WriteFile(dst, data, 0o644); err != nil {
		log.Print(err)
	}
}

func setBackingFile(disk *types.VirtualDisk, name string) {
	if b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
		b.GetVirtualDeviceFileBackingInfo().FileName = name
	}
}

// revertDisks discards the VM's deltas: each restarts as a copy of the snapshot's disk.
func revertDisks(vm *simulator.VirtualMachine, snap string) {
	files := state.snapFiles[snap]
	for _, disk := range disksOf(vm.Config.Hardware.Device) {
		if frozen, ok := files[disk.Key]; ok {
			copyData(vm, frozen, backingFile(disk))
		}
	}
}

// mergeDisks folds the VM's deltas into the (current) snapshot's disks, which the VM runs on
// again.
func mergeDisks(vm *simulator.VirtualMachine, snap string) {
	files := state.snapFiles[snap]
	for _, disk := range disksOf(vm.Config.Hardware.Device) {
		frozen, ok := files[disk.Key]
		delta := backingFile(disk)
		if !ok || frozen == delta {
			continue
		}
		copyData(vm, delta, frozen)
		if p, err := dataPath(vm, delta); err == nil {
			_ = os.Remove(p)
		}
		setBackingFile(disk, frozen)
	}
}

func cloneBacking(b types.BaseVirtualDeviceBackingInfo) types.BaseVirtualDeviceBackingInfo {
	switch x := b.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo:
		c := *x
		return &c
	case *types.VirtualDiskSparseVer2BackingInfo:
		c := *x
		return &c
	}
	return b
}

func setChangeID(disk *types.VirtualDisk, cid string) {
	switch x := disk.Backing.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo:
		x.ChangeId = cid
	case *types.VirtualDiskSparseVer2BackingInfo:
		x.ChangeId = cid
	}
}

func (h *wrapper) snapshotTask(w http.ResponseWriter, r *http.Request, snap types.ManagedObjectReference, remove bool) {
	vmRef, current := "", false
	if s, ok := simulator.Map.Get(snap).(*simulator.VirtualMachineSnapshot); ok {
		vmRef = s.Vm.Value
		if vm := vmByRef(s.Vm); vm != nil {
			simulator.Map.WithLock(vm, func() {
				current = vm.Snapshot != nil && vm.Snapshot.CurrentSnapshot != nil &&
					*vm.Snapshot.CurrentSnapshot == snap
			})
		}
	}
	rec := h.record(r)
	if task := taskOf(rec); task != nil && vmRef != "" {
		ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: vmRef}
		simulator.Map.WithLock(task, func() {
			task.Info.Entity = &ref
			if vm := vmByRef(ref); vm != nil {
				task.Info.EntityName = vm.Name
			}
		})
		if task.Info.State == types.TaskInfoStateSuccess {
			h.snapshotDone(vmByRef(ref), snap.Value, remove, current)
		}
	}
	copyRecorded(w, rec)
}

// snapshotDone applies a finished revert or removal to the disks and forgets a removed snapshot.
func (h *wrapper) snapshotDone(vm *simulator.VirtualMachine, snap string, remove, current bool) {
	state.mu.Lock()
	defer state.mu.Unlock()
	if vm != nil {
		simulator.Map.WithLock(vm, func() {
			switch {
			case !remove:
				revertDisks(vm, snap)
			case current:
				mergeDisks(vm, snap)
			}
		})
	}
	if remove {
		delete(state.snapDisks, snap)
		delete(state.snapVM, snap)
		delete(state.snapFiles, snap)
	}
}

func (h *wrapper) reconfigure(w http.ResponseWriter, r *http.Request, req *types.ReconfigVM_Task) {
	rec := h.record(r)
	if vm := vmByRef(req.This); vm != nil {
		simulator.Map.WithLock(vm, func() {
			syncSizes(vm)
			if req.Spec.ChangeTrackingEnabled != nil && !*req.Spec.ChangeTrackingEnabled {
				state.mu.Lock()
				for _, disk := range disksOf(vm.Config.Hardware.Device) {
					delete(state.epochs, vm.Self.Value+"/"+strconv.Itoa(int(disk.Key)))
					setChangeID(disk, "")
				}
				state.mu.Unlock()
			}
		})
	}
	copyRecorded(w, rec)
}

func (h *wrapper) createVM(w http.ResponseWriter, r *http.Request) {
	rec := h.record(r)
	if task := taskOf(rec); task != nil && task.Info.State == types.TaskInfoStateSuccess {
		if ref, ok := task.Info.Result.(types.ManagedObjectReference); ok {
			if vm := vmByRef(ref); vm != nil {
				simulator.Map.WithLock(vm, func() {
					vm.Capability.ChangeTrackingSupported = types.NewBool(true)
					syncSizes(vm)
				})
			}
		}
	}
	copyRecorded(w, rec)
}

func queryChangedDiskAreas(w http.ResponseWriter, req *types.QueryChangedDiskAreas) {
	state.mu.Lock()
	defer state.mu.Unlock()
	vm := vmByRef(req.This)
	if vm == nil {
		writeFault(w, "ManagedObjectNotFound", "managed object not found: "+req.This.Value, "")
		return
	}
	if req.Snapshot == nil {
		invalidArgument(w, "snapshot", "this simulator needs a snapshot")
		return
	}
	keys, ok := state.snapDisks[req.Snapshot.Value]
	if !ok || state.snapVM[req.Snapshot.Value] != vm.Self.Value {
		invalidArgument(w, "snapshot", "unknown snapshot "+req.Snapshot.Value)
		return
	}
	cur, ok := keys[req.DeviceKey]
	if !ok {
		invalidArgument(w, "deviceKey", fmt.Sprintf("no disk with key %d", req.DeviceKey))
		return
	}
	if fault := state.ctl(vm.Name).queryFault; fault != "" {
		writeFault(w, fault, "change tracking data is not usable", faultDetail(fault))
		return
	}
	if cur == "" {
		writeFault(w, "FileFault", "change tracking is not enabled for this disk",
			"<file>"+strconv.Itoa(int(req.DeviceKey))+"</file>")
		return
	}
	ek := vm.Self.Value + "/" + strconv.Itoa(int(req.DeviceKey))
	now := state.frozen[ek+"/"+cur]
	capacity := int64(len(now))
	if req.StartOffset < 0 || req.StartOffset >= capacity {
		invalidArgument(w, "startOffset", fmt.Sprintf("startOffset %d outside [0, %d)", req.StartOffset, capacity))
		return
	}
	var old []byte
	if req.ChangeId != "*" {
		var known bool
		old, known = state.frozen[ek+"/"+req.ChangeId]
		if !known {
			invalidArgument(w, "changeId", "unknown changeId "+req.ChangeId)
			return
		}
	}
	start := req.StartOffset - req.StartOffset%cbtBlock
	end := capacity
	if state.window > 0 && start+state.window < end {
		end = start + state.window
	}
	writeResponse(w, &types.QueryChangedDiskAreasResponse{Returnval: types.DiskChangeInfo{
		StartOffset: start, Length: end - start, ChangedArea: changed(now, old, start, end, req.ChangeId == "*"),
	}})
}

func changed(now, old []byte, start, end int64, all bool) []types.DiskChangeExtent {
	var out []types.DiskChangeExtent
	zero := make([]byte, cbtBlock)
	for off := start; off < end; off += cbtBlock {
		stop := off + cbtBlock
		if stop > end {
			stop = end
		}
		block := now[off:stop]
		var differs bool
		if all {
			differs = !bytes.Equal(block, zero[:len(block)])
		} else {
			was := zero[:len(block)]
			if off < int64(len(old)) {
				o := old[off:min64(stop, int64(len(old)))]
				was = append(append([]byte{}, o...), zero[:len(block)-len(o)]...)
			}
			differs = !bytes.Equal(block, was)
		}
		if !differs {
			continue
		}
		if n := len(out); n > 0 && out[n-1].Start+out[n-1].Length == off {
			out[n-1].Length += stop - off
		} else {
			out = append(out, types.DiskChangeExtent{Start: off, Length: stop - off})
		}
	}
	return out
}

func min64(a, b int64) int64 {
	if a < b {
		return a
	}
	return b
}

// ---- test control ----

type controlReq struct {
	VM           string            `json:"vm"`
	QuiesceFault *bool             `json:"quiesce_fault"`
	CBTSupported *bool             `json:"cbt_supported"`
	CBTReset     bool              `json:"cbt_reset"`
	QueryFault   *string           `json:"query_fault"`
	CBTWindow    *int64            `json:"cbt_window"`
	DropAt       *string           `json:"drop_at"`
	CallFaults   map[string]string `json:"call_faults"`
}

func findVM(name string) *simulator.VirtualMachine {
	for _, obj := range simulator.Map.All("VirtualMachine") {
		if vm, ok := obj.(*simulator.VirtualMachine); ok && vm.Name == name {
			return vm
		}
	}
	return nil
}

func control(w http.ResponseWriter, r *http.Request) {
	var req controlReq
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	state.mu.Lock()
	defer state.mu.Unlock()
	if req.CBTWindow != nil {
		state.window = *req.CBTWindow
	}
	if req.DropAt != nil {
		state.dropAt = *req.DropAt
	}
	for method, fault := range req.CallFaults {
		state.faults[method] = fault
	}
	if req.VM != "" {
		vm := findVM(req.VM)
		if vm == nil {
			http.Error(w, "no VM "+req.VM, http.StatusNotFound)
			return
		}
		c := state.ctl(req.VM)
		if req.QuiesceFault != nil {
			c.quiesceFault = *req.QuiesceFault
		}
		if req.QueryFault != nil {
			c.queryFault = *req.QueryFault
		}
		if req.CBTSupported != nil {
			v := *req.CBTSupported
			simulator.Map.WithLock(vm, func() { vm.Capability.ChangeTrackingSupported = &v })
		}
		if req.CBTReset { // forget every changeId handed out so far, keep the epoch's UUID
			prefix := vm.Self.Value + "/"
			for k := range state.frozen {
				if strings.HasPrefix(k, prefix) {
					delete(state.frozen, k)
				}
			}
		}
	}
	w.WriteHeader(http.StatusNoContent)
}

type diskInfo struct {
	Key      int32  `json:"key"`
	File     string `json:"file"`
	Data     string `json:"data"`
	Capacity int64  `json:"capacity"`
}

func info(w http.ResponseWriter) {
	out := map[string][]diskInfo{}
	for _, obj := range simulator.Map.All("VirtualMachine") {
		vm := obj.(*simulator.VirtualMachine)
		var disks []diskInfo
		simulator.Map.WithLock(vm, func() {
			for _, disk := range disksOf(vm.Config.Hardware.Device) {
				p, _ := dataPath(vm, backingFile(disk))
				disks = append(disks, diskInfo{disk.Key, backingFile(disk), p, capacityOf(disk)})
			}
		})
		out[vm.Name] = disks
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

// ---- setup ----

func prepare() {
	for _, obj := range simulator.Map.All("VirtualMachine") {
		vm := obj.(*simulator.VirtualMachine)
		vm.Capability.ChangeTrackingSupported = types.NewBool(true)
		if *diskMiB > 0 {
			for _, disk := range disksOf(vm.Config.Hardware.Device) {
				disk.CapacityInKB = *diskMiB * 1024
				disk.CapacityInBytes = *diskMiB << 20
			}
		}
		syncSizes(vm)
	}
}

func datastores() map[string]string {
	out := map[string]string{}
	for _, obj := range simulator.Map.All("Datastore") {
		ds := obj.(*simulator.Datastore)
		out[ds.Name] = ds.Info.GetDatastoreInfo().Url
	}
	return out
}

func linkDatastores(root string, dss map[string]string) error {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return err
	}
	for name, dir := range dss {
		link := filepath.Join(root, name)
		_ = os.Remove(link)
		if err := os.Symlink(dir, link); err != nil {
			return err
		}
	}
	return nil
}

func main() {
	flag.Parse()
	log.SetPrefix("vcsim-cbt: ")
	state.window = *cbtWindow

	model := simulator.VPX()
	model.Machine = *machines
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(*user, *password)}
	model.Service.TLS = new(tls.Config)
	prepare()

	server := model.Service.NewServer()
	server.Config.Handler = &wrapper{inner: server.Config.Handler}
	defer server.Close()

	dss := datastores()
	if *dsRoot != "" {
		if err := linkDatastores(*dsRoot, dss); err != nil {
			log.Fatal(err)
		}
	}
	sum := sha1.Sum(server.Certificate().Raw)
	pairs := make([]string, len(sum))
	for i, b := range sum {
		pairs[i] = fmt.Sprintf("%02X", b)
	}
	host, port, _ := strings.Cut(server.URL.Host, ":")
	_ = json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"url": server.URL.String(), "host": host, "port": port, "user": *user,
		"password": *password, "thumbprint": strings.Join(pairs, ":"), "datastores": dss,
	})

	done := make(chan os.Signal, 1)
	signal.Notify(done, syscall.SIGTERM, syscall.SIGINT)
	go func() { // the parent closing our stdin stops us too
		_, _ = io.Copy(ioutil.Discard, os.Stdin)
		done <- syscall.SIGTERM
	}()
	<-done
}
