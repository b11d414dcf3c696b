//! [`GuestMemoryAtomic`]: guest memory that can be replaced while other threads use it
//! (memory hotplug), with snapshots that keep every region they hold mapped.
//!
//! Readers take a snapshot, [`memory()`](GuestMemoryAtomic::memory), and use it for a batch of
//! accesses; a device thread that reads on every request keeps a [`MemoryCache`], whose
//! [`memory()`](MemoryCache::memory) costs one atomic load while nothing changed. Writers
//! [`lock()`](GuestMemoryAtomic::lock) and [`replace`](GuestMemoryExclusiveGuard::replace), or
//! call [`update`](GuestMemoryAtomic::update) with a function from the current memory to the
//! next. A removed region stays mapped until the last snapshot that holds it is dropped.
//!
//! ```
//! use std::sync::Arc;
//! use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};
//! use guestmem::mmap::MmapRegionBuilder;
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
//! let atomic = GuestMemoryAtomic::new(mem);
//! let before = atomic.memory();
//! atomic
//!     .update(|m| {
//!         let region = GuestRegionMmap::build(MmapRegionBuilder::new(0x10000), GuestAddress(0x10000))?;
//!         m.insert_region(Arc::new(region))
//!     })
//!     .unwrap();
//! assert_eq!(before.num_regions(), 1); // an old snapshot is unchanged
//! assert_eq!(atomic.memory().num_regions(), 2);
//! assert_eq!(atomic.generation(), 1);
//! atomic.memory().write_obj(1u8, GuestAddress(0x10000)).unwrap();
//! ```

use std::fmt;
use std::ops::Deref;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::{ArcSwap, Guard};

use crate::memory::GuestMemory;

struct Inner<M> {
    current: ArcSwap<M>,
    /// Bumped after every replacement; caches compare it to their own.
    generation: AtomicU64,
    writer: Mutex<()>,
}

/// Guest memory behind an atomic pointer: readers take snapshots, writers swap in new memory.
///
/// Cloning gives another handle on the same memory.
pub struct GuestMemoryAtomic<M> {
    inner: Arc<Inner<M>>,
}

impl<M> Clone for GuestMemoryAtomic<M> {
    fn clone(&self) -> Self {
        GuestMemoryAtomic { inner: self.inner.clone() }
    }
}

impl<M: fmt::Debug> fmt::Debug for GuestMemoryAtomic<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestMemoryAtomic")
            .field("generation", &self.generation())
            .field("memory", &*self.inner.current.load())
            .finish()
    }
}

/// A handle on guest memory that gives consistent snapshots of it: what a device holds, so that
/// it works the same on fixed memory (`&M`, `Arc<M>`, `Rc<M>`) and on memory that is hot-plugged
/// ([`GuestMemoryAtomic`]). vm-memory's trait of the same name, over guestmem's
/// [`GuestMemory`].
///
/// ```
/// use std::sync::Arc;
/// use guestmem::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
///
/// /// A device that reads its queue through whatever address space it was given.
/// struct Device<AS: GuestAddressSpace> {
///     mem: AS,
/// }
///
/// impl<AS: GuestAddressSpace> Device<AS> {
///     fn poll(&self) -> u16 {
///         let snapshot = self.mem.memory(); // one consistent memory map for this request
///         snapshot.read_obj(GuestAddress(0x10)).unwrap()
///     }
/// }
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// mem.write_obj(7u16, GuestAddress(0x10)).unwrap();
/// assert_eq!(Device { mem: &mem }.poll(), 7);
/// let shared = Arc::new(mem);
/// assert_eq!(Device { mem: shared.clone() }.poll(), 7);
/// let atomic = GuestMemoryAtomic::from_arc(shared);
/// assert_eq!(Device { mem: atomic.clone() }.poll(), 7);
/// ```
pub trait GuestAddressSpace: Clone {
    /// The memory a snapshot gives.
    type M: GuestMemory;

    /// A snapshot: a reference or guard that dereferences to the memory and keeps it (and every
    /// region it holds) alive.
    type T: Clone + Deref<Target = Self::M>;

    /// A snapshot of the memory as it is now.
    fn memory(&self) -> Self::T;
}

impl<M: GuestMemory> GuestAddressSpace for &M {
    type M = M;
    type T = Self;

    #[inline(always)]
    fn memory(&self) -> Self {
        self
    }
}

impl<M: GuestMemory> GuestAddressSpace for Rc<M> {
    type M = M;
    type T = Self;

    #[inline]
    fn memory(&self) -> Self {
        self.clone()
    }
}

impl<M: GuestMemory> GuestAddressSpace for Arc<M> {
    type M = M;
    type T = Self;

    #[inline]
    fn memory(&self) -> Self {
        self.clone()
    }
}

/// Snapshots are [`GuestMemoryAtomic::memory`]'s guards.
impl<M: GuestMemory> GuestAddressSpace for GuestMemoryAtomic<M> {
    type M = M;
    type T = GuestMemoryGuard<M>;

    #[inline]
    fn memory(&self) -> GuestMemoryGuard<M> {
        GuestMemoryAtomic::memory(self)
    }
}

/// A snapshot of the memory: derefs to it; the regions it holds stay mapped while it lives.
///
/// Taking one is arc-swap's lock-free `load` (a slot of the thread's own, no shared counter);
/// a clone holds a full `Arc` of the same memory (one atomic increment), so clones can be kept
/// for long and sent to other threads without tying up the thread's slots.
///
/// ```
/// use guestmem::{GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap};
/// let atomic = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
/// let guard = atomic.memory();
/// let copy = guard.clone();
/// atomic.lock().replace(GuestMemoryMmap::new());
/// assert_eq!((guard.num_regions(), copy.num_regions(), atomic.memory().num_regions()), (1, 1, 0));
/// assert_eq!(std::sync::Arc::strong_count(&copy.into_arc()), 2); // the guard's and ours
/// ```
pub struct GuestMemoryGuard<M> {
    guard: Guard<Arc<M>>,
}

impl<M> Clone for GuestMemoryGuard<M> {
    #[inline]
    fn clone(&self) -> Self {
        GuestMemoryGuard { guard: Guard::from_inner(Arc::clone(&self.guard)) }
    }
}

impl<M> GuestMemoryGuard<M> {
    /// The snapshot as an `Arc`, to keep for long.
    pub fn into_arc(self) -> Arc<M> {
        Guard::into_inner(self.guard)
    }
}

impl<M> Deref for GuestMemoryGuard<M> {
    type Target = M;

    #[inline(always)]
    fn deref(&self) -> &M {
        &self.guard
    }
}

impl<M: fmt::Debug> fmt::Debug for GuestMemoryGuard<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<M> GuestMemoryAtomic<M> {
    /// Wraps `memory`, at generation 0.
    pub fn new(memory: M) -> Self {
        Self::from_arc(Arc::new(memory))
    }

    /// Wraps shared `memory`, at generation 0.
    pub fn from_arc(memory: Arc<M>) -> Self {
        GuestMemoryAtomic {
            inner: Arc::new(Inner {
                current: ArcSwap::new(memory),
                generation: AtomicU64::new(0),
                writer: Mutex::new(()),
            }),
        }
    }

    /// A cheap snapshot of the current memory (arc-swap's lock-free `load`). Hold it for a
    /// batch of accesses, not for long: a writer's old memory is freed only when it goes.
    #[inline]
    pub fn memory(&self) -> GuestMemoryGuard<M> {
        GuestMemoryGuard { guard: self.inner.current.load() }
    }

    /// The current memory as an `Arc`, to keep for long.
    pub fn snapshot(&self) -> Arc<M> {
        self.inner.current.load_full()
    }

    /// How many times the memory was replaced.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// A per-thread cache whose [`memory()`](MemoryCache::memory) costs one atomic load while
    /// the memory is not replaced.
    pub fn cache(&self) -> MemoryCache<M> {
        let generation = self.generation();
        MemoryCache { source: self.clone(), generation, current: self.snapshot() }
    }

    /// Exclusive access for a writer: other writers wait; readers go on with the current
    /// memory until [`replace`](GuestMemoryExclusiveGuard::replace).
    pub fn lock(&self) -> GuestMemoryExclusiveGuard<'_, M> {
        // The mutex guards no data (only the order of writers), so a poisoned one is usable.
        let lock = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        GuestMemoryExclusiveGuard { parent: self, _lock: lock }
    }

    /// Replaces the memory with `f(current)` under the writer lock; on error nothing changes.
    pub fn update<E>(&self, f: impl FnOnce(&M) -> Result<M, E>) -> Result<(), E> {
        let guard = self.lock();
        let next = f(&guard.current())?;
        guard.replace(next);
        Ok(())
    }
}

/// A writer's exclusive hold on a [`GuestMemoryAtomic`], from [`GuestMemoryAtomic::lock`].
pub struct GuestMemoryExclusiveGuard<'a, M> {
    parent: &'a GuestMemoryAtomic<M>,
    _lock: MutexGuard<'a, ()>,
}

impl<M> fmt::Debug for GuestMemoryExclusiveGuard<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestMemoryExclusiveGuard").field("generation", &self.parent.generation()).finish()
    }
}

impl<M> GuestMemoryExclusiveGuard<'_, M> {
    /// The current memory.
    pub fn current(&self) -> Arc<M> {
        self.parent.snapshot()
    }

    /// Publishes `memory` and bumps the generation. Snapshots taken before keep the old one.
    pub fn replace(self, memory: M) {
        self.parent.inner.current.store(Arc::new(memory));
        // Release: a cache that sees the new generation also sees the new memory.
        self.parent.inner.generation.fetch_add(1, Ordering::Release);
    }
}

/// A thread's cached view of a [`GuestMemoryAtomic`]: [`memory()`](Self::memory) checks the
/// generation (one atomic load) and reloads only when the memory was replaced.
pub struct MemoryCache<M> {
    source: GuestMemoryAtomic<M>,
    generation: u64,
    current: Arc<M>,
}

impl<M> fmt::Debug for MemoryCache<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCache").field("generation", &self.generation).finish()
    }
}

impl<M> MemoryCache<M> {
    /// The current memory; reloaded only if a writer replaced it since the last call. The
    /// old memory is released on reload.
    #[inline(always)]
    pub fn memory(&mut self) -> &M {
        let generation = self.source.inner.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.reload(generation);
        }
        &self.current
    }

    #[cold]
    #[inline(never)]
    fn reload(&mut self, generation: u64) {
        self.current = self.source.snapshot();
        self.generation = generation;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_update_cache_and_generations() {
        let atomic = GuestMemoryAtomic::new(1u32);
        let mut cache = atomic.cache();
        assert_eq!(*cache.memory(), 1);
        let old = atomic.memory();
        atomic.lock().replace(2);
        assert_eq!((*old, *atomic.memory(), atomic.generation()), (1, 2, 1));
        assert_eq!(*cache.memory(), 2);
        assert_eq!(atomic.update(|m| Err::<u32, _>(format!("no {m}"))), Err("no 2".to_string()));
        assert_eq!(atomic.generation(), 1);
        atomic.update(|m| Ok::<_, ()>(m + 1)).unwrap();
        assert_eq!((*cache.memory(), *atomic.snapshot(), atomic.generation()), (3, 3, 2));
        let g = atomic.lock();
        assert_eq!(*g.current(), 3);
        assert!(format!("{g:?}").contains("generation: 2"));
        drop(g);
        assert!(format!("{:?}", atomic).contains("memory: 3"));
        assert!(format!("{:?}", atomic.memory()).contains('3'));
        assert!(format!("{cache:?}").contains("generation: 2"));
        // A clone is a handle on the same memory.
        let other = atomic.clone();
        other.lock().replace(9);
        assert_eq!(*atomic.memory(), 9);
        assert_eq!(*GuestMemoryAtomic::from_arc(Arc::new(5u8)).memory(), 5);
    }

    #[test]
    fn address_spaces_and_cloned_guards() {
        use crate::{Bytes, GuestAddress, GuestMemoryMmap};
        fn send_sync<T: Send + Sync>() {}
        send_sync::<GuestMemoryGuard<GuestMemoryMmap<crate::AtomicBitmap>>>();
        fn read<AS: GuestAddressSpace>(space: &AS) -> u8 {
            let snapshot = space.memory();
            let again = snapshot.clone();
            again.read_obj(GuestAddress(1)).unwrap()
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        mem.write_obj(3u8, GuestAddress(1)).unwrap();
        assert_eq!(read(&&mem), 3);
        let rc = Rc::new(mem.clone());
        assert_eq!(read(&rc), 3);
        let atomic = GuestMemoryAtomic::new(mem);
        assert_eq!(read(&atomic), 3);
        // A cloned guard outlives the guard it came from, and a replacement, on another thread.
        let guard = GuestAddressSpace::memory(&atomic);
        let copy = guard.clone();
        drop(guard);
        atomic.lock().replace(GuestMemoryMmap::new());
        let got = std::thread::spawn(move || copy.read_obj::<u8>(GuestAddress(1)).unwrap()).join().unwrap();
        assert_eq!(got, 3);
        assert!(atomic.memory().read_obj::<u8>(GuestAddress(1)).is_err());
    }
}
