//! Sensors on the gateway's own I²C bus (cargo feature `sensors`): a second ingest
//! source next to MQTT.
//!
//! Each `[[sensors]]` entry gets a thread of its own, because I²C through Linux
//! i2c-dev is blocking: the thread opens the bus (`linux_embedded_hal::I2cdev` on
//! `/dev/i2c-N`), starts the driver from `voither-firmware`, and every `period_ms` reads
//! the sensor once ([`read_once`]). Each reading becomes a device frame
//! ([`voither_firmware::frame::Frame`]), the same CBOR a microcontroller would publish:
//!
//! - `device_id` is [`device_id`] of the sensor's name, a stable FNV-1a hash;
//! - `counter` is the number of polls since the gateway started, failed ones included,
//!   so a jump in the counter shows readings that were missed;
//! - `timestamp_ms` is the gateway's wall clock at the reading.
//!
//! The record's `source` is the sensor's name, its `content_type` is [`CONTENT_TYPE`]
//! and its payload is the encoded frame. The threads hand records through a bounded
//! channel to one async task that appends them with [`Store::append_batch`] (one
//! durable commit for whatever is waiting), counts them like MQTT ingest does, and
//! wakes the uplink.
//!
//! A failed poll stores nothing: it is counted in
//! `voither_gateway_sensor_errors_total{sensor}` and logged, at most one line a minute
//! per sensor (with the number of failures not logged). A bus that cannot be opened
//! (no `/dev/i2c-N`, no permission), a sensor that does not answer and a BME280 whose
//! chip id is wrong are retried every period, from opening the bus on; a CRC mismatch
//! only loses that reading. Nothing a sensor does stops the gateway.
//!
//! When a `backpressure` lane is full, the appender retries and the channel fills, so
//! the sensor threads wait: readings are then taken late, not dropped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::MissedTickBehavior;
use tracing::{error, info, warn};
use voither_firmware::frame::{self, Frame, MAX_ENCODED_LEN};
use voither_firmware::{bme280, sht3x};
use voither_proto::limit::LogLimiter;

use crate::config::{SensorConfig, SensorKind};
use crate::metrics::Metrics;
use crate::store::{NewRecord, Store};

/// The content type of sensor records: one device frame in CBOR.
pub const CONTENT_TYPE: &str = "application/vnd.voither.frame+cbor";

/// Records waiting between the sensor threads and the store, at most.
const CHANNEL_RECORDS: usize = 256;

/// A failing sensor logs at most one line per this long.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Why a poll produced no reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SensorError {
    /// The bus device could not be opened (missing, or no permission).
    #[error("cannot open I2C bus {}: {message}", path.display())]
    Open {
        /// The bus device, e.g. `/dev/i2c-1`.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The bus reported an error: most often a NACK from an absent or unpowered sensor.
    #[error("I2C bus error: {0}")]
    Bus(String),
    /// A word read from the sensor did not match its CRC; the reading was discarded.
    #[error("CRC mismatch in data read from the sensor")]
    Crc,
    /// The device at the address is not a BME280 (carries the chip id it reported).
    #[error("not a BME280: chip id is {0:#04x}, expected 0x60")]
    ChipId(u8),
    /// The address is not one the kind of sensor can have.
    #[error("{address:#04x} is not an address of a {}", kind.as_str())]
    Address {
        /// The kind of sensor.
        kind: SensorKind,
        /// The address asked for.
        address: u8,
    },
    /// The frame could not be built or encoded.
    #[error("device frame: {0}")]
    Frame(frame::Error),
    /// Any other driver error.
    #[error("{0}")]
    Driver(String),
}

fn bus_error<E: embedded_hal::i2c::Error>(e: E) -> SensorError {
    SensorError::Bus(format!("{} ({e:?})", e.kind()))
}

fn sht3x_error<E: embedded_hal::i2c::Error>(e: sht3x::Error<E>) -> SensorError {
    match e {
        sht3x::Error::Bus(e) => bus_error(e),
        sht3x::Error::Crc => SensorError::Crc,
        other => SensorError::Driver(other.to_string()),
    }
}

fn bme280_error<E: embedded_hal::i2c::Error>(e: bme280::Error<E>) -> SensorError {
    match e {
        bme280::Error::Bus(e) => bus_error(e),
        bme280::Error::ChipId(id) => SensorError::ChipId(id),
        other => SensorError::Driver(other.to_string()),
    }
}

/// A started sensor driver of one of the supported kinds.
#[derive(Debug)]
pub enum Driver<I2C, D> {
    /// A Sensirion SHT3x.
    Sht3x(sht3x::Sht3x<I2C, D>),
    /// A Bosch BME280, initialised (calibration read, default settings).
    Bme280(bme280::Bme280<I2C, D>),
}

impl<I2C: I2c, D: DelayNs> Driver<I2C, D> {
    /// Creates the driver for a `kind` sensor at `address` on `i2c`, and prepares the
    /// chip: nothing for an SHT3x; for a BME280 the chip id check, a soft reset and the
    /// calibration read, with the default settings (1× oversampling, filter off).
    pub fn start(kind: SensorKind, i2c: I2C, delay: D, address: u8) -> Result<Self, SensorError> {
        let bad_address = SensorError::Address { kind, address };
        match kind {
            SensorKind::Sht3x => {
                let a = match address {
                    0x44 => sht3x::Address::Default,
                    0x45 => sht3x::Address::Alternate,
                    _ => return Err(bad_address),
                };
                Ok(Driver::Sht3x(sht3x::Sht3x::new(i2c, delay, a)))
            }
            SensorKind::Bme280 => {
                let a = match address {
                    0x76 => bme280::Address::Primary,
                    0x77 => bme280::Address::Secondary,
                    _ => return Err(bad_address),
                };
                let mut d = bme280::Bme280::new(i2c, delay, a);
                d.init(bme280::Settings::default()).map_err(bme280_error)?;
                Ok(Driver::Bme280(d))
            }
        }
    }

    /// The kind of sensor.
    pub fn kind(&self) -> SensorKind {
        match self {
            Driver::Sht3x(_) => SensorKind::Sht3x,
            Driver::Bme280(_) => SensorKind::Bme280,
        }
    }

    /// Destroys the driver and returns the bus and the delay.
    pub fn release(self) -> (I2C, D) {
        match self {
            Driver::Sht3x(d) => d.destroy(),
            Driver::Bme280(d) => d.destroy(),
        }
    }
}

/// Reads the sensor once and returns the readings as a device frame with the given
/// `device_id`, `counter` and `timestamp_ms`: temperature and relative humidity from an
/// SHT3x; temperature, pressure and relative humidity from a BME280. Blocks for the
/// measurement (15.5 ms for an SHT3x, 9.3 ms for a BME280) in the driver's delay.
pub fn read_once<I2C: I2c, D: DelayNs>(
    driver: &mut Driver<I2C, D>,
    device_id: u32,
    counter: u32,
    timestamp_ms: u64,
) -> Result<Frame, SensorError> {
    let mut frame = Frame::new(device_id, counter, timestamp_ms);
    match driver {
        Driver::Sht3x(d) => frame.extend(d.measure().map_err(sht3x_error)?.readings()),
        Driver::Bme280(d) => frame.extend(d.measure().map_err(bme280_error)?.readings()),
    }
    .map_err(SensorError::Frame)?;
    Ok(frame)
}

/// Encodes a frame (at most [`MAX_ENCODED_LEN`] bytes, on the stack) into a payload.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, SensorError> {
    let mut buf = [0u8; MAX_ENCODED_LEN];
    let len = frame.encode(&mut buf).map_err(SensorError::Frame)?;
    Ok(buf[..len].to_vec())
}

/// The frame `device_id` of a sensor: FNV-1a (32 bits) of its name. Stable across
/// restarts, builds and versions, so a reader can key on it.
pub fn device_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Opens a real bus: `sensor.bus` (`/dev/i2c-N`) through i2c-dev, with a delay that
/// sleeps the calling thread, which is the sensor's own blocking thread.
pub fn open_linux(
    sensor: &SensorConfig,
) -> Result<(linux_embedded_hal::I2cdev, linux_embedded_hal::Delay), SensorError> {
    let i2c = linux_embedded_hal::I2cdev::new(&sensor.bus)
        .map_err(|e| SensorError::Open { path: sensor.bus.clone(), message: e.to_string() })?;
    Ok((i2c, linux_embedded_hal::Delay))
}

/// One sensor's state on its thread: the driver once started, the poll count, and the
/// error accounting.
struct Poller<I2C, D, F> {
    cfg: SensorConfig,
    device_id: u32,
    open: F,
    driver: Option<Driver<I2C, D>>,
    polls: u32,
    failing: bool,
    metrics: Arc<Metrics>,
    limit: LogLimiter,
    started: tokio::time::Instant,
}

impl<I2C, D, F> Poller<I2C, D, F>
where
    I2C: I2c,
    D: DelayNs,
    F: FnMut(&SensorConfig) -> Result<(I2C, D), SensorError>,
{
    fn new(cfg: SensorConfig, open: F, metrics: Arc<Metrics>) -> Self {
        Self {
            device_id: device_id(&cfg.name),
            cfg,
            open,
            driver: None,
            polls: 0,
            failing: false,
            metrics,
            limit: LogLimiter::new(LOG_EVERY),
            started: tokio::time::Instant::now(),
        }
    }

    /// One poll: the record of a reading, or `None` after counting and logging why not.
    fn poll(&mut self) -> Option<NewRecord> {
        let counter = self.polls;
        self.polls = self.polls.wrapping_add(1);
        match self.try_poll(counter) {
            Ok(record) => {
                if self.failing {
                    self.failing = false;
                    if self.limit.allow("recovered", self.started.elapsed()).is_some() {
                        info!(sensor = %self.cfg.name, "Sensor reads again.");
                    }
                }
                Some(record)
            }
            Err(e) => {
                self.failing = true;
                self.metrics.sensor_errors.get_or_create(&Metrics::sensor(&self.cfg.name)).inc();
                if e != SensorError::Crc {
                    // Open the bus and start the driver again next period: the sensor
                    // may have been replugged or lost power (a BME280 then forgets its
                    // settings), or the bus device may be back.
                    self.driver = None;
                }
                if let Some(suppressed) = self.limit.allow("poll", self.started.elapsed()) {
                    warn!(
                        sensor = %self.cfg.name,
                        kind = self.cfg.kind.as_str(),
                        bus = %self.cfg.bus.display(),
                        address = %format!("{:#04x}", self.cfg.address()),
                        error = %e,
                        suppressed,
                        retry_every_ms = self.cfg.period_ms,
                        "Sensor poll failed; retrying every period."
                    );
                }
                None
            }
        }
    }

    fn try_poll(&mut self, counter: u32) -> Result<NewRecord, SensorError> {
        if self.driver.is_none() {
            let (i2c, delay) = (self.open)(&self.cfg)?;
            self.driver = Some(Driver::start(self.cfg.kind, i2c, delay, self.cfg.address())?);
        }
        let driver = self.driver.as_mut().expect("started above");
        let now = crate::unix_ms();
        let frame = read_once(driver, self.device_id, counter, now)?;
        Ok(NewRecord {
            lane: self.cfg.lane.clone(),
            ingest_ts_ms: now,
            source: self.cfg.name.clone(),
            content_type: Some(CONTENT_TYPE.into()),
            payload: encode(&frame)?,
        })
    }
}

/// Runs the sensor source for `cfg.sensors` on the real buses until `shutdown` turns
/// true, then stores what was read and returns.
pub async fn run(
    cfg: Arc<crate::Config>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    appended: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
) {
    run_with(cfg.sensors.clone(), open_linux, store, metrics, appended, shutdown).await;
}

/// [`run`] with the bus opened by `open` (tests pass mocks): one thread per sensor,
/// one task appending their records. Returns once every thread has stopped and every
/// reading taken is stored (or, at shutdown, could not be).
pub async fn run_with<I2C, D, F>(
    sensors: Vec<SensorConfig>,
    open: F,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    appended: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
) where
    I2C: I2c + Send + 'static,
    D: DelayNs + Send + 'static,
    F: FnMut(&SensorConfig) -> Result<(I2C, D), SensorError> + Clone + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<NewRecord>(CHANNEL_RECORDS);
    let rt = Handle::current();
    let mut threads = Vec::new();
    for s in sensors {
        let name = s.name.clone();
        info!(
            sensor = %s.name,
            kind = s.kind.as_str(),
            bus = %s.bus.display(),
            address = %format!("{:#04x}", s.address()),
            period_ms = s.period_ms,
            lane = %s.lane,
            "Polling sensor."
        );
        let period = s.period();
        let poller = Poller::new(s, open.clone(), metrics.clone());
        let (tx, stop, rt) = (tx.clone(), shutdown.clone(), rt.clone());
        match std::thread::Builder::new()
            .name(format!("sensor {name}"))
            .spawn(move || poll_loop(poller, period, tx, stop, rt))
        {
            Ok(t) => threads.push(t),
            Err(e) => error!(sensor = %name, error = %e, "Cannot start the sensor's thread; it is not polled."),
        }
    }
    drop(tx);
    crate::appender::append_loop(rx, store, metrics, appended, shutdown, CHANNEL_RECORDS).await;
    // Every sender is gone, so every thread has left its loop: joining does not wait.
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            if t.join().is_err() {
                error!("A sensor thread panicked.");
            }
        }
    })
    .await;
}

/// The loop of one sensor thread: a reading every `period` (the first at once), each
/// sent to the appender, until `stop` turns true.
///
/// This is a blocking thread, not async code: the I²C calls and the driver's delays
/// block it. It waits for the next tick (and for room in the channel) on the runtime
/// through `rt.block_on`, so a shutdown wakes it at once.
fn poll_loop<I2C, D, F>(
    mut poller: Poller<I2C, D, F>,
    period: Duration,
    tx: mpsc::Sender<NewRecord>,
    mut stop: watch::Receiver<bool>,
    rt: Handle,
) where
    I2C: I2c,
    D: DelayNs,
    F: FnMut(&SensorConfig) -> Result<(I2C, D), SensorError>,
{
    let _runtime = rt.enter();
    let mut tick = tokio::time::interval(period);
    // A slow poll (a bus timeout) delays the following ones; it never causes a burst.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let stopped = rt.block_on(async {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => true,
                _ = tick.tick() => false,
            }
        });
        if stopped {
            break;
        }
        let Some(record) = poller.poll() else { continue };
        let sent = rt.block_on(async {
            tokio::select! {
                biased;
                r = tx.send(record) => r.is_ok(),
                _ = stop.wait_for(|s| *s) => false,
            }
        });
        if !sent {
            break;
        }
    }
}

#[cfg(all(test, feature = "sensors"))]
mod tests {
    use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource, Operation};
    use embedded_hal_mock::eh1::delay::{CheckedDelay, NoopDelay, Transaction as DelayT};
    use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as I2cT};
    use voither_firmware::frame::Reading;
    use voither_firmware::sht3x::crc8;

    use super::*;
    use crate::store::{FullPolicy, LaneSpec};

    const SHT: u8 = 0x44;

    /// A word followed by its CRC, as the SHT3x sends it.
    fn word(w: u16) -> [u8; 3] {
        let [msb, lsb] = w.to_be_bytes();
        [msb, lsb, crc8(&[msb, lsb])]
    }

    /// The bus transactions of one SHT3x measurement (high repeatability) answering
    /// raw words `t` and `rh`.
    fn sht3x_measurement(t: u16, rh: u16) -> [I2cT; 2] {
        [I2cT::write(SHT, vec![0x24, 0x00]), I2cT::read(SHT, [word(t), word(rh)].concat())]
    }

    fn sensor(name: &str, kind: SensorKind, lane: &str, period_ms: u64) -> SensorConfig {
        SensorConfig { name: name.into(), kind, bus: "/dev/i2c-1".into(), address: None, period_ms, lane: lane.into() }
    }

    fn errors(metrics: &Metrics, name: &str) -> u64 {
        metrics.sensor_errors.get_or_create(&Metrics::sensor(name)).get()
    }

    #[test]
    fn device_id_is_fnv1a_of_the_name() {
        // Reference values of 32-bit FNV-1a.
        assert_eq!(device_id(""), 0x811c_9dc5);
        assert_eq!(device_id("a"), 0xe40c_292c);
        assert_eq!(device_id("foobar"), 0xbf9c_f968);
        assert_ne!(device_id("sensor/room-1"), device_id("sensor/room-2"));
    }

    #[test]
    fn sht3x_measurement_becomes_a_frame_in_milli_units() {
        // 0x6666 is exactly 40 % of full scale: -45 + 175 × 0.4 = 25 °C; 0x7333 is 45 %RH.
        let i2c = I2cMock::new(&sht3x_measurement(0x6666, 0x7333));
        let delay = CheckedDelay::new(&[DelayT::delay_us(15_500)]);
        let mut driver = Driver::start(SensorKind::Sht3x, i2c, delay, SHT).unwrap();
        assert_eq!(driver.kind(), SensorKind::Sht3x);
        let frame = read_once(&mut driver, 42, 7, 1_700_000_000_000).unwrap();
        let (mut i2c, mut delay) = driver.release();
        i2c.done();
        delay.done();

        let expected = [Reading::temperature_milli_celsius(25_000), Reading::relative_humidity_milli_percent(45_000)];
        assert_eq!(frame.readings(), &expected);
        let decoded = Frame::decode(&encode(&frame).unwrap()).unwrap();
        assert_eq!((decoded.device_id, decoded.counter, decoded.timestamp_ms), (42, 7, 1_700_000_000_000));
        assert_eq!(decoded.readings(), &expected);
        assert_eq!(decoded.readings()[0].value, 25_000);
        assert_eq!(decoded.readings()[1].value, 45_000);
    }

    #[test]
    fn a_crc_error_is_an_error_and_no_record() {
        let mut bad = [word(0x6666), word(0x7333)].concat();
        bad[5] ^= 0x01; // the humidity word's CRC
        let i2c = I2cMock::new(&[I2cT::write(SHT, vec![0x24, 0x00]), I2cT::read(SHT, bad.clone())]);
        let mut driver = Driver::start(SensorKind::Sht3x, i2c, NoopDelay::new(), SHT).unwrap();
        assert_eq!(read_once(&mut driver, 1, 0, 0).unwrap_err(), SensorError::Crc);
        driver.release().0.done();

        // Through the poller: no record, one error counted, the driver kept (a CRC
        // error loses the reading, not the sensor), and the next reading goes through.
        let mut expected = vec![I2cT::write(SHT, vec![0x24, 0x00]), I2cT::read(SHT, bad)];
        expected.extend(sht3x_measurement(0x6666, 0x7333));
        let mock = I2cMock::new(&expected);
        let metrics = Arc::new(Metrics::new());
        let mut opens = 0;
        let bus = mock.clone();
        let mut poller = Poller::new(
            sensor("s", SensorKind::Sht3x, "telemetry", 100),
            |_: &SensorConfig| {
                opens += 1;
                Ok((bus.clone(), NoopDelay::new()))
            },
            metrics.clone(),
        );
        assert!(poller.poll().is_none());
        assert_eq!(errors(&metrics, "s"), 1);
        let record = poller.poll().expect("the next reading");
        assert_eq!(Frame::decode(&record.payload).unwrap().counter, 1, "the failed poll was counted");
        assert!(metrics.encode().contains("voither_gateway_sensor_errors_total{sensor=\"s\"} 1"));
        drop(poller);
        assert_eq!(opens, 1);
        let mut mock = mock;
        mock.done();
    }

    #[test]
    fn a_missing_bus_is_logged_and_retried_every_poll() {
        let metrics = Arc::new(Metrics::new());
        let mut s = sensor("s", SensorKind::Sht3x, "telemetry", 100);
        s.bus = "/nonexistent/i2c-9".into();
        let mut poller = Poller::new(s.clone(), open_linux, metrics.clone());
        assert!(poller.poll().is_none());
        assert!(poller.poll().is_none());
        assert_eq!(errors(&metrics, "s"), 2);
        let Err(e) = open_linux(&s) else { panic!("opened a missing bus") };
        assert!(matches!(e, SensorError::Open { .. }));
        assert!(e.to_string().contains("/nonexistent/i2c-9"), "{e}");
    }

    #[test]
    fn a_bus_error_or_a_wrong_chip_restarts_the_driver() {
        // BME280: a BMP280 (chip id 0x58) answers first, then nothing (NACK).
        let mock = I2cMock::new(&[
            I2cT::write_read(0x76, vec![0xD0], vec![0x58]),
            I2cT::write_read(0x76, vec![0xD0], vec![0x00])
                .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)),
        ]);
        let metrics = Arc::new(Metrics::new());
        let mut opens = 0;
        let bus = mock.clone();
        let mut poller = Poller::new(
            sensor("b", SensorKind::Bme280, "telemetry", 100),
            |_: &SensorConfig| {
                opens += 1;
                Ok((bus.clone(), NoopDelay::new()))
            },
            metrics.clone(),
        );
        assert!(poller.poll().is_none());
        assert!(poller.poll().is_none());
        drop(poller);
        assert_eq!(opens, 2, "the bus is opened again after each failure");
        assert_eq!(errors(&metrics, "b"), 2);
        let mut mock = mock;
        mock.done();

        let e = bus_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address));
        assert!(e.to_string().contains("did not acknowledge"), "{e}");
        let mut unused = I2cMock::new(&[]);
        let Err(e) = Driver::start(SensorKind::Sht3x, unused.clone(), NoopDelay::new(), 0x76) else {
            panic!("0x76 is no SHT3x address")
        };
        assert_eq!(e, SensorError::Address { kind: SensorKind::Sht3x, address: 0x76 });
        unused.done();
    }

    /// A bus that turns `stop` true while the sensor answers its `n`th reading, so the
    /// poller takes exactly `n` readings whatever the scheduling.
    struct StopAfter {
        inner: I2cMock,
        reads_left: usize,
        stop: Arc<watch::Sender<bool>>,
    }

    impl StopAfter {
        fn count_read(&mut self) {
            self.reads_left -= 1;
            if self.reads_left == 0 {
                self.stop.send_replace(true);
            }
        }
    }

    impl embedded_hal::i2c::ErrorType for StopAfter {
        type Error = ErrorKind;
    }

    impl I2c for StopAfter {
        fn read(&mut self, address: u8, read: &mut [u8]) -> Result<(), Self::Error> {
            self.inner.read(address, read)?;
            self.count_read();
            Ok(())
        }
        fn write(&mut self, address: u8, write: &[u8]) -> Result<(), Self::Error> {
            self.inner.write(address, write)
        }
        fn write_read(&mut self, address: u8, write: &[u8], read: &mut [u8]) -> Result<(), Self::Error> {
            self.inner.write_read(address, write, read)
        }
        fn transaction(&mut self, address: u8, operations: &mut [Operation<'_>]) -> Result<(), Self::Error> {
            self.inner.transaction(address, operations)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn n_polls_become_n_records_in_the_configured_lane() {
        const N: usize = 4;
        let dir = tempfile::tempdir().unwrap();
        let lanes: Vec<LaneSpec> = ["alarms", "telemetry"]
            .iter()
            .enumerate()
            .map(|(i, name)| LaneSpec {
                name: (*name).into(),
                priority: i as u8,
                max_bytes: 1 << 20,
                ttl_ms: None,
                policy: FullPolicy::DropOldest,
            })
            .collect();
        let store = Arc::new(Store::open(&dir.path().join("store"), 1 << 20, &lanes, 2 << 20).unwrap());
        let metrics = Arc::new(Metrics::new());
        let appended = Arc::new(Notify::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_tx = Arc::new(stop_tx);

        // Raw temperatures 0x6666 + i: 25.000 °C and up; humidity 45 %RH.
        let expected: Vec<I2cT> = (0..N as u16).flat_map(|i| sht3x_measurement(0x6666 + i * 100, 0x7333)).collect();
        let mock = I2cMock::new(&expected);
        let (bus, stop) = (mock.clone(), stop_tx.clone());
        let open = move |s: &SensorConfig| {
            assert_eq!(s.bus, PathBuf::from("/dev/i2c-1"));
            Ok((StopAfter { inner: bus.clone(), reads_left: N, stop: stop.clone() }, NoopDelay::new()))
        };
        let name = "sensor/room-1";
        let sensors = vec![sensor(name, SensorKind::Sht3x, "telemetry", 10)];
        tokio::time::timeout(
            Duration::from_secs(30),
            run_with(sensors, open, store.clone(), metrics.clone(), appended.clone(), stop_rx),
        )
        .await
        .expect("the source stops once told to");
        let mut mock = mock;
        mock.done();

        let (records, gaps) = store.read_from("telemetry", 1, 100, 1 << 20).unwrap();
        assert!(gaps.is_empty());
        assert_eq!(records.len(), N);
        assert!(store.read_from("alarms", 1, 100, 1 << 20).unwrap().0.is_empty());
        let mut last_ts = 0;
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
            assert_eq!(r.source, name);
            assert_eq!(r.content_type, Some(CONTENT_TYPE));
            let frame = Frame::decode(r.payload).unwrap();
            assert_eq!(frame.device_id, device_id(name));
            assert_eq!(frame.counter, i as u32);
            assert!(frame.timestamp_ms >= last_ts && frame.timestamp_ms == r.ingest_ts_ms);
            last_ts = frame.timestamp_ms;
            let t = voither_firmware::sht3x::convert_temperature(0x6666 + i as u16 * 100);
            assert_eq!(
                frame.readings(),
                &[Reading::temperature_milli_celsius(t), Reading::relative_humidity_milli_percent(45_000)]
            );
        }
        let text = metrics.encode();
        for line in [
            "voither_gateway_ingested_records_total{lane=\"telemetry\"} 4",
            "voither_gateway_stored_records_total{lane=\"telemetry\"} 4",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert_eq!(errors(&metrics, name), 0);
        tokio::time::timeout(Duration::from_secs(1), appended.notified()).await.expect("the uplink was woken");
    }
}
