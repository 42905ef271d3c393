"""The trip-booking example: three participant services (flight, hotel, car), each its
own process with its own SQLite store, booked by one saga. Any of them can be told to
refuse bookings for some cities (``fail_cities``), so a demo can show compensation."""

from accord.participants.trip._service import KINDS, serve_trip, trip_app

__all__ = ["KINDS", "serve_trip", "trip_app"]
